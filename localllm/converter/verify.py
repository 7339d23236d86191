"""``--verify``: run the HF original (transformers, fp32) and the GGUF (llama.cpp)
on the same token ids and compare their next-token distributions.

Example:
    >>> rep = verify("hf-model", "model.gguf", quant="Q8_0")      # doctest: +SKIP
    >>> rep.ok, rep.nmse                                        # doctest: +SKIP
    (True, 2.1e-05)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from localllm.errors import InsufficientMemoryError, PrerequisiteError

# per quant type: (max logit NMSE, min top-1 agreement, max mean KL in nats); see docs/convert.md
THRESHOLDS: dict[str, tuple[float, float, float]] = {
    "F32": (1e-5, 0.99, 1e-4), "F16": (1e-4, 0.98, 1e-3), "BF16": (1e-3, 0.97, 5e-3),
    "Q8_0": (5e-3, 0.95, 0.02), "Q6_K": (2e-2, 0.90, 0.05), "Q5_K_M": (4e-2, 0.88, 0.08),
    "Q5_1": (4.5e-2, 0.86, 0.09), "Q5_0": (5e-2, 0.85, 0.10), "Q4_K_M": (8e-2, 0.80, 0.15),
    "Q4_1": (1e-1, 0.77, 0.2), "Q4_0": (1.2e-1, 0.75, 0.25),
}
PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "Привет! Как дела?", "1, 2, 3, 5, 8, 13,")


@dataclass
class VerifyReport:
    """Logit agreement of a GGUF with its HF original."""

    quant: str
    tokens: int = 0
    tokenization_match: bool = True
    nmse: float = 0.0
    top1: float = 1.0
    kl: float = 0.0
    greedy_match: bool = True
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def compare_logits(ref: np.ndarray, got: np.ndarray) -> tuple[float, float, float]:
    """(NMSE, top-1 agreement, mean KL(ref‖got)) of two ``[tokens, vocab]`` arrays.

    Example:
        >>> a = np.random.default_rng(0).normal(size=(4, 10))
        >>> compare_logits(a, a)
        (0.0, 1.0, 0.0)
    """
    n = min(ref.shape[-1], got.shape[-1])  # padded vocab rows are never predicted
    ref, got = ref[..., :n].astype(np.float64), got[..., :n].astype(np.float64)
    nmse = float(np.mean((ref - got) ** 2) / max(np.var(ref), 1e-30))
    top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
    lr, lg = _log_softmax(ref), _log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lg), -1)))
    return nmse, top1, max(kl, 0.0)


def gguf_logits(path: Path, ids: list[int], *, n_threads: int = 2) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one sequence)."""
    from localllm import runtime

    m = runtime.LlamaModel(path)
    try:
        ctx = runtime.Context(m, n_ctx=max(64, len(ids) + 8), n_threads=n_threads, n_batch=max(64, len(ids)))
        b = runtime.Batch(max(64, len(ids)))
        try:
            for i, t in enumerate(ids):
                b.add(t, i, 0, True)
            ctx.decode(b)
            return np.stack([ctx.logits(i).copy() for i in range(len(ids))])
        finally:
            b.close()
            ctx.close()
    finally:
        m.close()


def gguf_tokenize(path: Path, texts: Sequence[str]) -> list[list[int]]:
    """``texts`` as the runtime tokenizes a prompt of the GGUF at ``path``: with the HF
    tokenizer embedded in it when there is one it can read, else llama.cpp's; BOS as
    the GGUF says, special-token text kept literal (``Model.tokenize(text)``)."""
    from localllm import runtime
    from localllm.hftok import from_metadata
    from localllm.validate import read_header

    metadata = read_header(path).metadata  # the bounded header check, before llama.cpp opens the file
    m = runtime.LlamaModel(path, vocab_only=True)
    try:
        hf = from_metadata(metadata, bos=m.bos, eos=m.eos, add_bos=m.add_bos, add_eos=m.add_eos)
        if hf is not None:
            return [hf.encode(t, add_special=m.add_bos, special=False) for t in texts]
        return [list(m.tokenize(t, add_special=m.add_bos, parse_special=False)) for t in texts]
    finally:
        m.close()


def memory_needed(n_params: int, gguf_bytes: int) -> int:
    """Bytes ``verify`` holds at its peak: the HF model in float32, the GGUF, and about 1 GiB for torch
    and the loading (the Llama-3.2-1B shape: 7.5 GiB measured against 7.2 estimated)."""
    return n_params * 4 + gguf_bytes + (1 << 30)


def _check_memory(src: str | Path, gguf_path: Path) -> None:
    """Refuse, before loading anything, a comparison that would not fit in the memory available (a
    7B in float32 is 29 GB: the kernel would kill the process)."""
    from localllm import hardware
    from localllm.converter.checkpoint import Checkpoint

    n_params = sum(r.n_elements for r in Checkpoint.open(src).tensors.values())
    need, avail = memory_needed(n_params, gguf_path.stat().st_size), hardware.memory()["available"]
    if avail and need > avail:
        raise InsufficientMemoryError(
            f"--verify runs the original model in float32 beside the GGUF: about {need / 2**30:.1f} GiB, and "
            f"{avail / 2**30:.1f} GiB is available; {gguf_path} is written, not verified",
            hint="verify on a machine with more free memory, or convert without --verify",
            needed_bytes=need, available_bytes=avail)


def verify(src: str | Path, gguf_path: str | Path, *, quant: str, greedy_tokens: int = 8) -> VerifyReport:
    """Compare ``gguf_path`` with the HF checkpoint ``src`` on :data:`PROMPTS`."""
    try:
        import torch
        import transformers
    except ImportError:
        raise PrerequisiteError("--verify needs torch and transformers",
                                hint="pip install 'localllm[verify]'") from None

    _check_memory(src, Path(gguf_path))
    rep = VerifyReport(quant)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model.eval()
    refs, gots = [], []
    ids_all = [list(hf_tok(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    ours = gguf_tokenize(Path(gguf_path), PROMPTS)
    rep.tokenization_match = ours == ids_all
    for ids in ids_all:
        with torch.no_grad():
            refs.append(model(torch.tensor([ids])).logits[0].float().numpy())
        gots.append(gguf_logits(Path(gguf_path), ids))
        rep.tokens += len(ids)
    rep.nmse, rep.top1, rep.kl = compare_logits(np.concatenate(refs), np.concatenate(gots))
    # greedy continuation of the first prompt, token by token on both sides
    ids = list(ids_all[0])
    for _ in range(greedy_tokens):
        with torch.no_grad():
            a = int(model(torch.tensor([ids])).logits[0, -1].argmax())
        b = int(gguf_logits(Path(gguf_path), ids)[-1].argmax())
        if a != b:
            rep.greedy_match = False
            break
        ids.append(a)
    max_nmse, min_top1, max_kl = THRESHOLDS[quant]
    if not math.isfinite(rep.nmse) or rep.nmse > max_nmse:
        rep.failures.append(f"logit NMSE {rep.nmse:.2e} > {max_nmse:.0e}")
    if rep.top1 < min_top1:
        rep.failures.append(f"top-1 agreement {rep.top1:.3f} < {min_top1}")
    if rep.kl > max_kl:
        rep.failures.append(f"mean KL {rep.kl:.2e} > {max_kl}")
    if not rep.tokenization_match:
        rep.failures.append("tokenization differs from HF")
    return rep
