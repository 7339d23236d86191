"""An importance matrix from the calibration text lowers KL on text it never saw,
on a real model (SmolLM2-135M rebuilt as an HF checkpoint from the shipped file)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from localllm.converter import convert  # noqa: E402
from localllm.evaluate import evaluate  # noqa: E402
from tests.convert_fixtures import hf_from_gguf  # noqa: E402


def test_imatrix_lowers_q4_k_m_kl_on_held_out_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import store, resolve

    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "home"))   # the reference cache of this test only
    hf = hf_from_gguf(resolve.resolve("smollm2-135m:q4_1"), tmp_path / "hf")
    ref = tmp_path / "f32.gguf"
    assert convert(hf, ref, quant="F32").imatrix == "not used: F32 is written directly"
    plain = convert(hf, tmp_path / "plain.gguf", quant="Q4_K_M", imatrix=False)
    guided = convert(hf, tmp_path / "guided.gguf", quant="Q4_K_M")   # the default: on, torch is here
    assert plain.imatrix == "off (--no-imatrix)"
    assert guided.imatrix.startswith("from the calibration text, 211 tensors")  # 30 layers × 7 + the tied output
    # the evaluation text is not the calibration text: this is held-out KL
    a = evaluate(plain.path, reference=ref, n_ctx=512)
    b = evaluate(guided.path, reference=ref, n_ctx=512)
    assert b.kl_mean < 0.8 * a.kl_mean, (a.kl_mean, b.kl_mean)
    assert b.top1_agreement > a.top1_agreement
