"""Shared fixtures: the real built-in models (cached once per machine in the
store) and tiny GGUFs the tests write themselves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ggufs import write_tiny_llama  # noqa: E402


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
