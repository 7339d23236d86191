"""Shared fixtures: the real built-in models (cached once per machine in the
store) and tiny GGUFs the tests write themselves. Helpers that are not fixtures
are in helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import write_tiny_llama


def pytest_configure(config: pytest.Config) -> None:
    """Started in the background from a script (``./test &``), pytest inherits SIGINT ignored, and so
    would every program it starts: the tests that press Ctrl-C in `run` and `serve` would then wait in
    vain. Python's own handler is reset to the default in a child, an ignored signal is not."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from localllm import store, resolve

    return resolve.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from localllm import store, resolve

    return resolve.resolve("gemma3-270m")


@pytest.fixture(scope="session")
def model(default_model_path: Path):
    from localllm import Model

    with Model(default_model_path, n_ctx=1024, seed=0) as m:
        yield m


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
