"""Fixtures of the generation core's tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ref(default_model_path: Path):
    """llama.cpp's own logits on the default model (tests/llama_reference.py), one per test module."""
    from tests.llama_reference import Reference

    r = Reference(default_model_path, 512)
    yield r
    r.close()
