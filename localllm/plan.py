"""Memory planning: what a model needs at a context size, and where it fits.

Everything is read from the GGUF header (never the tensor data):

- weights: per-layer bytes (``blk.N.*``), plus embedding and output bytes;
- KV cache: per layer, ``n_ctx_layer × (n_embd_k_gqa + n_embd_v_gqa) × bytes(cache type)``,
  where sliding-window layers only keep ``window + n_ubatch`` cells;
- compute buffer: llama.cpp's scheduler graph for one micro-batch, estimated
  from the widest activations and the logits row.

Example:
    >>> p = make_plan("model.gguf", n_ctx=4096)            # doctest: +SKIP
    >>> p.fits, p.gpu_layers                               # doctest: +SKIP
    (True, 0)
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from localllm import hardware
from localllm.validate import Header, read_header

_BLK = re.compile(r"^blk\.(\d+)\.")
_F16 = 2


@dataclass
class Plan:
    path: str
    n_ctx: int
    n_layer: int
    weights_bytes: int
    layer_bytes: list[int]
    non_layer_bytes: int
    kv_bytes: int
    compute_bytes: int
    total_bytes: int
    ram_available: int
    gpu_free: int
    gpu_layers: int
    fits: bool
    reasons: list[str] = field(default_factory=list)
    max_ctx_that_fits: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _kv_layout(h: Header) -> tuple[list[int], list[bool], int]:
    """Per layer: K+V width (elements per cell), and whether the layer is sliding-window."""
    n_layer = int(h.get("block_count", 0))
    n_embd = int(h.get("embedding_length", 0))
    n_head = h.get("attention.head_count", 1)
    n_head_kv = h.get("attention.head_count_kv", n_head)

    def per_layer(v: Any) -> list[int]:
        return [int(x) for x in v] if isinstance(v, list) else [int(v)] * n_layer

    heads, heads_kv = per_layer(n_head), per_layer(n_head_kv)
    widths = []
    for i in range(n_layer):
        hd = n_embd // heads[i] if heads[i] else 0
        k_dim = int(h.get("attention.key_length", hd))
        v_dim = int(h.get("attention.value_length", hd))
        widths.append(heads_kv[i] * (k_dim + v_dim))
    window = int(h.get("attention.sliding_window", 0) or 0)
    swa = [False] * n_layer
    if window:
        pattern = h.get("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern[:n_layer]]
        elif h.arch == "gemma3":
            swa = [(i + 1) % 6 != 0 for i in range(n_layer)]  # 5 local : 1 global
        elif h.arch == "gemma2":
            swa = [i % 2 == 0 for i in range(n_layer)]
        else:
            swa = [True] * n_layer
    return widths, swa, window


def estimate(h: Header, n_ctx: int, *, n_ubatch: int = 512, n_seq: int = 1) -> dict[str, Any]:
    """Bytes for weights (per layer), KV cache and compute buffer at ``n_ctx``."""
    n_layer = int(h.get("block_count", 0))
    layer_bytes = [0] * n_layer
    non_layer = 0
    for t in h.tensors:
        m = _BLK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += t.nbytes
        else:
            non_layer += t.nbytes
    widths, swa, window = _kv_layout(h)
    kv = 0
    for w, is_swa in zip(widths, swa):
        cells = min(n_ctx, window * n_seq + n_ubatch) if is_swa else n_ctx
        kv += cells * w * _F16
    n_embd = int(h.get("embedding_length", 0))
    n_ff = h.get("feed_forward_length", 4 * n_embd)
    n_ff = max(n_ff) if isinstance(n_ff, list) else int(n_ff)
    n_vocab = h.array_lengths.get("tokenizer.ggml.tokens", 0)
    n_head = h.get("attention.head_count", 1)
    n_head = max(n_head) if isinstance(n_head, list) else int(n_head)
    ub = min(n_ubatch, n_ctx)
    # graph: a few live activations of width max(n_embd, n_ff), the attention
    # scores for one micro-batch, and the logits for the output rows
    compute = 4 * ub * (3 * n_embd + 2 * n_ff) + 4 * ub * n_ctx * n_head + 4 * n_vocab * ub
    # output buffer: logits for n_seq rows, kept by the context
    compute += 4 * n_vocab * max(n_seq, 1)
    return {"layer_bytes": layer_bytes, "non_layer_bytes": non_layer, "weights_bytes": sum(layer_bytes) + non_layer,
            "kv_bytes": kv, "compute_bytes": compute}


def make_plan(path: str | os.PathLike[str], *, n_ctx: int | None = None, gpu_memory: int | None = None,
              ram_available: int | None = None) -> Plan:
    """Plan ``path`` at ``n_ctx`` (default: min(trained context, 4096)).

    GPU layers are chosen greedily (output layer first) while they fit in
    ``gpu_memory`` or the devices' free memory.
    """
    from localllm import runtime

    h = read_header(path)
    n_layer = int(h.get("block_count", 0))
    n_ctx = n_ctx or min(int(h.get("context_length", 4096) or 4096), 4096)
    est = estimate(h, n_ctx)
    total = est["weights_bytes"] + est["kv_bytes"] + est["compute_bytes"]
    ram = ram_available if ram_available is not None else hardware.memory()["available"]
    reasons = []
    gpu_free = 0
    if runtime.supports_gpu_offload():
        gpu_free = sum(d["memory_free"] for d in runtime.backend_devices() if d["type"] in ("gpu", "igpu"))
        if gpu_memory is not None:
            gpu_free = min(gpu_free, gpu_memory) if gpu_free else gpu_memory
    else:
        reasons.append("this llama.cpp build has no GPU offload: all layers stay on the CPU")
    gpu_layers = 0
    if gpu_free:
        budget = gpu_free - est["compute_bytes"]
        per_layer_kv = est["kv_bytes"] / max(n_layer, 1)
        for b in est["layer_bytes"]:
            if budget < b + per_layer_kv:
                break
            budget -= b + per_layer_kv
            gpu_layers += 1
        reasons.append(f"{gpu_layers} of {n_layer} layers fit in {gpu_free / 2**30:.1f} GiB of GPU memory")
    on_cpu = total - (sum(est["layer_bytes"][:gpu_layers]) + est["kv_bytes"] * gpu_layers / max(n_layer, 1))
    fits = on_cpu <= ram
    max_ctx = None
    if not fits:
        reasons.append(f"needs {on_cpu / 2**20:.0f} MiB of RAM but {ram / 2**20:.0f} MiB is available")
        lo, hi = 0, n_ctx
        while lo < hi:  # largest context that fits
            mid = (lo + hi + 1) // 2
            e = estimate(h, mid)
            if e["weights_bytes"] + e["kv_bytes"] + e["compute_bytes"] <= ram:
                lo = mid
            else:
                hi = mid - 1
        max_ctx = lo if lo >= 256 else None
    return Plan(path=str(path), n_ctx=n_ctx, n_layer=n_layer, weights_bytes=est["weights_bytes"],
                layer_bytes=est["layer_bytes"], non_layer_bytes=est["non_layer_bytes"], kv_bytes=est["kv_bytes"],
                compute_bytes=est["compute_bytes"], total_bytes=total, ram_available=ram, gpu_free=gpu_free,
                gpu_layers=gpu_layers, fits=fits, reasons=reasons, max_ctx_that_fits=max_ctx)


__all__ = ["Plan", "estimate", "make_plan"]
