"""The loader on bad model files and settings: a missing path or name, a file that is not a
GGUF or is cut short, an unknown architecture, a directory, bad constructor values."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm import Model
from localllm.errors import (InvalidArgumentError, InvalidModelFileError, ModelNotFoundError,
                             UnsupportedArchitectureError)
from tests.helpers import write_tiny_llama


def test_missing_path() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        Model("/nonexistent/model.gguf")
    assert isinstance(e.value, FileNotFoundError) and e.value.hint


def test_unknown_model_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'no-such-model'"):
        Model("no-such-model")


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "notes.gguf"
    p.write_text("just some text, not a model " * 10)
    with pytest.raises(InvalidModelFileError, match="GGUF magic"):
        Model(p)


def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(InvalidModelFileError):
            Model(p)


def test_unknown_architecture(tmp_path: Path) -> None:
    p = write_tiny_llama(tmp_path / "alien.gguf", arch="alienformer")
    with pytest.raises(UnsupportedArchitectureError, match="alienformer"):
        Model(p)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="directory"):
        Model(tmp_path)


def test_bad_constructor_values(tiny_gguf: Path) -> None:
    for kw in ({"n_ctx": 0}, {"n_ctx": 10**9}, {"n_threads": 0}, {"n_gpu_layers": "most"}, {"n_gpu_layers": -2}):
        with pytest.raises(InvalidArgumentError):
            Model(tiny_gguf, **kw)

