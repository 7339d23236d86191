"""The vocabulary we write is at least as faithful to Hugging Face as the one
llama.cpp's own ``convert_hf_to_gguf.py`` writes, for every architecture in the
tests: llama.cpp's tokenizer on each file against ``tokenizers`` on the probe
corpus (benchmarks/tokenizer_vs_anchor.py prints the table)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests.convert_fixtures import ARCHS  # noqa: E402
from tests.helpers import ROOT  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
import native  # noqa: E402

ANCHOR = native.cache_dir() / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ANCHOR.is_file(), reason="llama.cpp's sdist is not in the benchmark cache "
                                 "(tests use no network; `python benchmarks/native.py` fetches it once)")]


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3"])  # gemma3: a 262k vocabulary, minutes
def test_our_vocabulary_matches_hf_at_least_as_often_as_the_anchors(arch: str, tmp_path: Path) -> None:
    from tokenizer_vs_anchor import compare

    r = compare(arch, tmp_path)
    assert r.cases >= 80
    assert r.ours >= r.anchor, (r.ours, r.anchor, r.anchor_error)
