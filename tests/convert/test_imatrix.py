"""An importance matrix from the calibration text lowers KL on text it never saw,
on a real model (SmolLM2-135M rebuilt as an HF checkpoint from the shipped file)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    # 30 layers × 7 + the tied output; this checkpoint is float32, so collected in float32
    assert guided.imatrix.startswith("from the calibration text (float32), 211 tensors"), guided.imatrix
    # the evaluation text is not the calibration text: this is held-out KL
    a = evaluate(plain.path, reference=ref, n_ctx=512)
    b = evaluate(guided.path, reference=ref, n_ctx=512)
    assert b.kl_mean < 0.8 * a.kl_mean, (a.kl_mean, b.kl_mean)
    assert b.top1_agreement > a.top1_agreement


def test_imatrix_that_would_not_fit_is_skipped_or_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collecting runs the whole model in torch: where the memory available is less than that
    needs, the default skips it and says why, and an explicit --imatrix is refused before loading."""
    from localllm import errors, hardware, resolve
    import localllm.converter.imatrix as imx

    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "home"))
    hf = hf_from_gguf(resolve.resolve("smollm2-135m:q4_1"), tmp_path / "hf")
    from safetensors import safe_open

    n_params = 0
    for f in hf.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            n_params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    need = imx.memory_needed(n_params, "float32", hidden=576, n_vocab=49152)
    assert n_params * 4 < need < n_params * 4 + (1 << 30)
    assert imx.memory_needed(n_params, "bfloat16") < imx.memory_needed(n_params, "float32")
    assert imx.torch_dtype_name({"BF16", "F32"}) == "bfloat16" and imx.torch_dtype_name({"F32"}) == "float32"

    def collect_must_not_run(*a: object, **k: object) -> None:
        raise AssertionError("the model was loaded although it does not fit")

    monkeypatch.setattr(imx, "collect", collect_must_not_run)
    # the weights alone would fit; with torch's own memory and one window's activations they do not
    monkeypatch.setattr(hardware, "memory", lambda: {"total": 1 << 30, "available": n_params * 4 + (64 << 20)})
    r = convert(hf, tmp_path / "auto.gguf", quant="Q4_K_M")
    assert r.imatrix.startswith("skipped: collecting one runs the model in torch (float32), which needs about "), \
        r.imatrix
    out = tmp_path / "forced.gguf"
    with pytest.raises(errors.InsufficientMemoryError, match="--imatrix: collecting one"):
        convert(hf, out, quant="Q4_K_M", imatrix=True)
    assert not out.exists()
