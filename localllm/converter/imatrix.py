"""An importance matrix for llama.cpp's quantizer, computed from the HF model.

For every matrix that multiplies activations, the mean of the squared input
activation of each column over a calibration text: what ``llama-imatrix``
collects through llama.cpp's eval callback, here collected with forward hooks
on the original model (torch + transformers), so no llama.cpp tool is needed.
``llama_model_quantize`` then weighs each column's rounding error by it.
The calibration text (:func:`calibration_text`) is not the evaluation text,
so KL measured on the latter is measured on text the matrix never saw.

Example:
    >>> m = collect("hf/SmolLM2-135M", calibration_text(), gguf_arch="llama")   # doctest: +SKIP
    >>> m["blk.0.attn_q.weight"].shape                            # doctest: +SKIP
    (576,)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

from localllm.errors import PrerequisiteError


def calibration_text() -> str:
    """English verse, Python and French shipped for calibration (``localllm/data/README.md``)."""
    import importlib.resources

    return importlib.resources.files("localllm").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def available() -> bool:
    """torch and transformers are importable (the ``verify`` extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def torch_dtype_name(weight_dtypes: set[str]) -> str:
    """The dtype the model is run in for collecting: bfloat16 when the checkpoint holds 16-bit
    weights (its own precision for BF16; F16 runs slowly on CPUs, BF16 keeps its range), so a 7B
    takes 15 GB rather than the 30 GB of float32; float32 for a float32 checkpoint."""
    return "float32" if "F32" in weight_dtypes and not weight_dtypes & {"BF16", "F16"} else "bfloat16"


def memory_needed(n_params: int, dtype: str, *, n_ctx: int = 512, hidden: int = 4096, n_vocab: int = 32000) -> int:
    """Bytes that :func:`collect` holds at its peak: the weights in ``dtype``, one window's
    logits in float32 and its activations, and torch's own ~0.5 GiB."""
    per = 4 if dtype == "float32" else 2
    return n_params * per + n_ctx * n_vocab * 4 * 2 + n_ctx * hidden * 4 * 64 + (512 << 20)


def collect(src: str | os.PathLike[str], text: str, *, gguf_arch: str, n_ctx: int = 512, tied: bool = False,
            dtype: str = "float32",
            progress: Callable[[int, int], None] | None = None) -> dict[str, np.ndarray]:
    """{GGUF tensor name: mean squared input activation per column} from the HF checkpoint ``src``
    run in ``dtype`` on ``text`` in windows of ``n_ctx`` tokens (statistics summed in float32)."""
    if not available():
        raise PrerequisiteError("an importance matrix needs torch and transformers",
                                hint="pip install 'localllm[verify]', or convert with --no-imatrix")
    import torch
    import transformers

    src = Path(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(src)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    n_layer = int(getattr(model.config, "num_hidden_layers", 0) or model.config.get_text_config().num_hidden_layers)
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[gguf_arch]
    names = gguf.get_tensor_name_map(arch, n_layer)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def fn(_mod, inputs, _out) -> None:
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = []
    for mname, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        target = names.get_name(f"{mname}.weight", try_suffixes=(".weight",))
        if mname == "lm_head" and tied:
            target = "token_embd.weight"  # llama.cpp multiplies by the embeddings when output.weight is absent
        if target is not None:
            handles.append(mod.register_forward_hook(hook(target)))
    windows = [ids[i:i + n_ctx] for i in range(0, len(ids), n_ctx) if len(ids[i:i + n_ctx]) > 1]
    try:
        with torch.no_grad():
            for k, w in enumerate(windows):
                model(torch.tensor([w]))
                if progress:
                    progress(k + 1, len(windows))
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n]).numpy().astype(np.float32) for n in sums}


__all__ = ["available", "calibration_text", "collect", "memory_needed", "torch_dtype_name"]
