"""Shared fixtures: the real built-in models (cached once per machine in the
store) and tiny GGUFs the tests write themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufs import write_tiny_llama  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """Started in the background from a script (``./test &``), pytest inherits SIGINT ignored, and so
    would every program it starts: the tests that press Ctrl-C in `run` and `serve` would then wait in
    vain. Python's own handler is reset to the default in a child, an ignored signal is not."""
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def turn_end_cut(ids: list[int], end: int) -> int:
    """How much of a chat prompt a later prompt reuses: up to the end of its last finished turn
    (token ``end``) that is at least MIN_CHUNK tokens after the previous one (the rule of
    localllm.core.lanes.cuts, written again from its documentation)."""
    from localllm.core.lanes import MIN_CHUNK

    ends = [i + 1 for i, t in enumerate(ids) if t == end]
    return max((e for e, b in zip(ends, [0] + ends) if e - b >= MIN_CHUNK), default=0)


def default_quant() -> str:
    """The default model's version on this CPU, as the measured table says (else as first use measured it)."""
    import json

    from localllm import catalog, settings

    entry = catalog.quant_table().get(catalog.DEFAULT_MODEL, {}).get(catalog.feature_set())
    if entry is not None:
        return str(entry["quant"]).upper()
    rec = json.loads((settings.models_dir() / catalog.DEFAULT_MODEL / "auto.json").read_text())
    return str(rec["version"]).upper()


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from localllm import store

    return store.resolve("smollm2-135m")


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    from localllm import store

    return store.resolve("gemma3-270m")


@pytest.fixture(scope="session")
def model(default_model_path: Path):
    from localllm import Model

    with Model(default_model_path, n_ctx=1024, seed=0) as m:
        yield m


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
