"""Memory planning: what a model needs at a context size, and where it fits.

Everything is read from the GGUF header (never the tensor data). The terms
follow what llama.cpp (the vendored ``src/`` of llama-cpp-python 0.3.36)
actually allocates and touches on a CPU build; docs/plan.md has the sources
and the measurements:

- **weights**: mapped (``mmap``), the file is memory-mapped and llama.cpp
  pre-faults the whole mapping at load, so the whole file becomes resident
  (page cache shared with other processes, but counted in this process's RSS).
  Read into memory (the default where huge pages back it and it fits:
  :func:`weights_mapped`), only the tensors are resident;
- **repack**: on x86 with AVX2 the CPU backend copies some quant types
  (Q4_0, Q4_K, IQ4_NL, MXFP4; Q2_K with AVX-512) of matmul weights into an
  interleaved layout in anonymous memory: *in addition to* the mapped file,
  or *instead of* their copy when the weights are read into memory;
- **vocabulary**: llama.cpp's token tables (per token and per BPE merge);
- **KV cache**: per layer, ``cells × (n_embd_k_gqa + n_embd_v_gqa) × bytes(cache type)``.
  ``n_ctx`` is padded to 256. Sliding-window layers keep every cell because
  llama.cpp's default is ``swa_full`` (our runtime keeps it); without it they
  would keep ``pad(window + n_ubatch, 256)``. The buffer is zeroed, so resident;
- **output buffer**: one logits row per sequence (``n_vocab × 4``);
- **compute buffer**: llama.cpp *reserves* about ``4 × n_ubatch × (n_vocab + 2·n_embd)``
  (flash attention on, which is ``auto``'s choice on CPU); on the CPU only the
  activations a full micro-batch touches become resident
  (about ``4 × n_ubatch × (3·n_embd + 4·n_ff)`` plus the f16 mask
  ``2 × n_ctx × n_ubatch``). On a GPU the whole reservation is real memory.
  With flash attention **off** the attention scores are a tensor of their own,
  ``4 × n_ctx × n_ubatch × n_head`` (f32), reserved and, once a micro-batch
  attends over a full context, resident (smollm2-135m at 16,384 cells: llama.cpp
  reserves 326.4 MiB against 98.25 with it on; this formula: 333).

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
from localllm.errors import InvalidArgumentError
from localllm.formats import KV_TYPES, QUANTS
from localllm.validate import Header, read_header

_BLK = re.compile(r"^blk\.(\d+)\.")
# ggml type ids that the x86 CPU backend repacks (ggml-cpu/repack.cpp, ggml_repack_get_optimal_repack_type)
_REPACK_AVX2 = {2: "Q4_0", 12: "Q4_K", 20: "IQ4_NL", 39: "MXFP4"}
_REPACK_AVX512 = {10: "Q2_K"}
# on ARM with NEON + dotprod/i8mm more types are repacked; approximated by this set
_REPACK_ARM = {2: "Q4_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 20: "IQ4_NL", 39: "MXFP4", 8: "Q8_0"}
# llama.cpp's vocabulary tables: bytes per token (text, score, attributes,
# token→id map, piece cache) and per BPE merge (rank map); fitted to the two
# built-in models (docs/plan.md) and consistent with the structures in llama-vocab.cpp
_VOCAB_PER_TOKEN = 160
_VOCAB_PER_MERGE = 120
DEFAULT_MAX_CONTEXT = 4096  # a laptop-sized KV cache; ask for more with --ctx / n_ctx


def default_context(trained: int) -> int:
    """The context used when none is asked for: the trained one, capped at 4096."""
    return min(trained or DEFAULT_MAX_CONTEXT, DEFAULT_MAX_CONTEXT)


def context_size(requested: int | None, trained: int, *, param: str = "n_ctx") -> int:
    """The context a model runs at (``Model`` and ``serve``): ``requested`` or the
    default, refused past the trained length.

    Example:
        >>> context_size(None, 8192), context_size(2048, 8192)
        (4096, 2048)
    """
    n = requested or default_context(trained)
    if trained and n > trained:
        raise InvalidArgumentError(f"{param} {n} is larger than the {trained} tokens this model was trained on",
                                   param=param, hint=f"use {param} {trained} or less")
    return n


_FIXED_OVERHEAD = 4 * 2**20  # contexts, thread pool, graph metadata
_GPU_HEADROOM = 512 * 2**20  # CUDA context and driver allocations outside llama.cpp's buffers (not measured here)
# the quants suggested when a model does not fit ("another quant would fit"), bits per weight from formats
ALTERNATIVES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "IQ4_XS", "Q3_K_M", "Q2_K")


@dataclass
class Estimate:
    """Bytes a model needs at one context size (see the module docstring for each term)."""

    n_ctx: int
    n_ubatch: int
    n_layer: int
    file_bytes: int
    weights_bytes: int
    layer_bytes: list[int]
    non_layer_bytes: int
    repack_bytes: int
    vocab_bytes: int
    kv_bytes: int
    kv_layer_bytes: list[int]
    output_bytes: int
    compute_reserved_bytes: int
    compute_resident_bytes: int
    output_head_bytes: int = 0    # output.weight, or the token embedding when the output is tied to it
    output_tied: bool = False     # tied: the GPU gets a copy and the CPU keeps its own for the lookup
    mmap: bool = True             # weights mapped from the file; False: read into memory

    @property
    def weights_resident_bytes(self) -> int:
        """The weights' resident memory with every layer on the CPU: mapped, the whole file
        plus the repacked copies; read, each tensor once (repacked ones only in their new layout)."""
        return self.file_bytes + self.repack_bytes if self.mmap else self.weights_bytes

    @property
    def ram_bytes(self) -> int:
        """Resident memory with every layer on the CPU."""
        return (self.weights_resident_bytes + self.vocab_bytes + self.kv_bytes + self.output_bytes
                + self.compute_resident_bytes + _FIXED_OVERHEAD)


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
    ram_bytes: int = 0
    vram_bytes: int = 0
    repack_bytes: int = 0
    vocab_bytes: int = 0
    output_bytes: int = 0
    compute_reserved_bytes: int = 0
    file_bytes: int = 0
    quant: str = ""
    parameters: int = 0
    mmap: bool = True
    alternatives: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _per_layer(v: Any, n: int) -> list[int]:
    return [int(x) for x in v[:n]] if isinstance(v, list) else [int(v)] * n


def kv_layout(h: Header) -> tuple[list[int], list[int], list[bool], int]:
    """Per layer: K width, V width (elements per cell), sliding-window flag; and the window."""
    n_layer = int(h.get("block_count", 0))
    n_embd = int(h.get("embedding_length", 0))
    heads = _per_layer(h.get("attention.head_count", 1), n_layer)
    heads_kv = _per_layer(h.get("attention.head_count_kv", h.get("attention.head_count", 1)), n_layer)
    k_w, v_w = [], []
    for i in range(n_layer):
        hd = n_embd // heads[i] if heads[i] else 0
        k_w.append(heads_kv[i] * int(h.get("attention.key_length", hd)))
        v_w.append(heads_kv[i] * int(h.get("attention.value_length", hd)))
    window = int(h.get("attention.sliding_window", 0) or 0)
    swa = [False] * n_layer
    if window:
        pattern = h.get("attention.sliding_window_pattern")
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern[:n_layer]]
        elif h.arch == "gemma3":  # llama-model.cpp: set_swa_pattern(6): every 6th layer is global
            swa = [(i + 1) % 6 != 0 for i in range(n_layer)]
        elif h.arch == "gemma2":
            swa = [i % 2 == 0 for i in range(n_layer)]
        else:
            swa = [True] * n_layer
    return k_w, v_w, swa, window


def _this_cpu() -> dict[str, Any]:
    """hardware.cpu(), plus whether this llama.cpp build repacks at all (runtime.extra_buffers_usable)."""
    from localllm import runtime

    return {**hardware.cpu(), "repack": runtime.extra_buffers_usable()}


def _repack_types(cpu_flags: dict[str, bool], arch: str, repack: bool = True) -> dict[int, str]:
    if not repack:
        return {}
    if arch in ("arm64", "aarch64"):
        return _REPACK_ARM if cpu_flags.get("neon") else {}
    types = dict(_REPACK_AVX2) if cpu_flags.get("avx2") else {}
    if cpu_flags.get("avx512f"):
        types.update(_REPACK_AVX512)
    return types


def _pad(n: int, to: int = 256) -> int:
    return (n + to - 1) // to * to


def estimate(h: Header, n_ctx: int, *, n_ubatch: int = 512, n_seq: int = 1, cache_type: str = "f16",
             swa_full: bool = True, cpu: dict[str, Any] | None = None, cache_type_v: str | None = None,
             mmap: bool = True, flash_attn: bool = True) -> Estimate:
    """Bytes for weights, KV cache, buffers at ``n_ctx`` (CPU placement).

    Example:
        >>> estimate(read_header("m.gguf"), 4096).ram_bytes     # doctest: +SKIP
        274857984
    """
    n_layer = int(h.get("block_count", 0))
    cpu = cpu if cpu is not None else _this_cpu()
    repack_types = _repack_types(cpu.get("flags", {}), cpu.get("arch", ""), cpu.get("repack", True))
    layer_bytes = [0] * n_layer
    non_layer = repack = 0
    for t in h.tensors:
        m = _BLK.match(t.name)
        if m and int(m.group(1)) < n_layer:
            layer_bytes[int(m.group(1))] += t.nbytes
        else:
            non_layer += t.nbytes
        # only matmul weights are repacked: 2-D, in a block or the output head, never the embedding lookup
        if (t.type in repack_types and len(t.shape) == 2 and t.shape[1] % 8 == 0
                and (m or t.name == "output.weight")):
            repack += t.nbytes
    sizes = {t.name: t.nbytes for t in h.tensors}
    tied = "output.weight" not in sizes
    head = sizes.get("output.weight", sizes.get("token_embd.weight", 0)) + sizes.get("output_norm.weight", 0)
    n_ctx_p = _pad(n_ctx)
    k_w, v_w, swa, window = kv_layout(h)
    per_k, per_v = KV_TYPES[cache_type].bytes, KV_TYPES[cache_type_v or cache_type].bytes
    kv_layers = []
    for kw, vw, is_swa in zip(k_w, v_w, swa):
        cells = n_ctx_p if (swa_full or not is_swa) else min(n_ctx_p, _pad(window * n_seq + n_ubatch))
        kv_layers.append(int(cells * (kw * per_k + vw * per_v)))
    n_embd = int(h.get("embedding_length", 0))
    n_ff = h.get("feed_forward_length", 4 * n_embd)
    n_ff = max(n_ff) if isinstance(n_ff, list) else int(n_ff)
    n_vocab = h.array_lengths.get("tokenizer.ggml.tokens", 0)
    n_merges = h.array_lengths.get("tokenizer.ggml.merges", 0)
    ub = min(n_ubatch, n_ctx_p)
    reserved = 4 * ub * (n_vocab + 2 * n_embd)
    resident = 4 * ub * (3 * n_embd + 4 * n_ff) + 2 * n_ctx_p * ub
    if not flash_attn:  # the attention scores of a micro-batch over every cell, all heads, f32
        scores = 4 * n_ctx_p * ub * max(_per_layer(h.get("attention.head_count", 1), n_layer) or [1])
        reserved, resident = max(reserved, scores + resident), resident + scores
    return Estimate(
        n_ctx=n_ctx_p, n_ubatch=ub, n_layer=n_layer, file_bytes=h.file_size,
        weights_bytes=sum(layer_bytes) + non_layer, layer_bytes=layer_bytes, non_layer_bytes=non_layer,
        repack_bytes=repack, vocab_bytes=n_vocab * _VOCAB_PER_TOKEN + n_merges * _VOCAB_PER_MERGE,
        kv_bytes=sum(kv_layers), kv_layer_bytes=kv_layers, output_bytes=4 * n_vocab * max(n_seq, 1),
        compute_reserved_bytes=reserved, compute_resident_bytes=resident,
        output_head_bytes=head, output_tied=tied, mmap=mmap)


def split(e: Estimate, gpu_layers: int) -> tuple[int, int]:
    """(RAM, VRAM) bytes with ``gpu_layers`` offloaded. llama.cpp (llama-model.cpp, ``i_gpu_start =
    n_layer + 1 - n_gpu_layers``) counts the output head first: 1 moves the head, N the head and the
    last N - 1 repeating layers. Measured on lavapipe: docs/gpu.md."""
    if gpu_layers <= 0:
        return e.ram_bytes, 0
    g = min(gpu_layers, e.n_layer + 1)
    on_gpu = range(e.n_layer + 1 - g, e.n_layer)
    moved = sum(e.layer_bytes[i] for i in on_gpu)
    kv = sum(e.kv_layer_bytes[i] for i in on_gpu)
    # with the head on the GPU, the logits are computed there: the whole compute reservation is device memory
    vram = moved + e.output_head_bytes + kv + e.compute_reserved_bytes
    # offloaded weights are read once for upload and their mapping is released; a tied head's embedding
    # stays on the CPU for the token lookup
    ram = e.ram_bytes - moved - kv - (0 if e.output_tied else e.output_head_bytes)
    return ram, vram


def layer_split(n_layer: int, gpu_layers: int) -> str:
    """Where llama.cpp puts the layers with ``gpu_layers`` offloaded (the head first; see :func:`split`).

    Example:
        >>> layer_split(30, 10)
        'GPU: output head, layers 21-29; CPU: token embeddings, layers 0-20'
        >>> layer_split(30, 0)
        'CPU: all 30 layers'
    """
    g = max(0, min(gpu_layers, n_layer + 1))
    if g == 0:
        return f"CPU: all {n_layer} layers"
    first = n_layer + 1 - g  # the first repeating layer on the GPU
    gpu = "output head" + (f", layers {first}-{n_layer - 1}" if first < n_layer else "")
    cpu = "token embeddings" + (f", layers 0-{first - 1}" if first > 0 else "")
    return f"GPU: {gpu}; CPU: {cpu}"


def _devices_free() -> tuple[bool, int]:
    from localllm import runtime

    if not runtime.supports_gpu_offload():
        return False, 0
    return True, sum(d["memory_free"] for d in runtime.backend_devices() if d["type"] in ("gpu", "igpu"))


def weights_mapped(h: Header, n_ctx: int, *, n_seq: int = 1, ram: int | None = None,
                   cpu: dict[str, Any] | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
                   flash_attn: bool = True) -> bool:
    """``mmap`` auto, the one rule that planning, loading and the pool share: read the weights into memory
    where huge pages back them
    (``hardware.weights_in_memory``) and the model, so held, fits in ``ram`` (default:
    available RAM); else map the file. Mapped, the kernel can drop the weights' page cache
    under pressure and read it again, so a model larger than RAM still runs (slowly);
    read into memory, it would not.

    Example:
        >>> weights_mapped(read_header("m.gguf"), 4096, ram=1 << 20)   # doctest: +SKIP
        True
    """
    if not hardware.weights_in_memory():
        return True
    ram = ram if ram is not None else hardware.memory()["available"]
    return estimate(h, n_ctx, n_seq=n_seq, cpu=cpu, cache_type=cache_type_k, cache_type_v=cache_type_v,
                    mmap=False, flash_attn=flash_attn).ram_bytes > ram


def make_plan(path: str | os.PathLike[str] | Header, *, n_ctx: int | None = None, gpu_memory: int | None = None,
              ram_available: int | None = None, n_ubatch: int = 512, offload: bool | None = None,
              gpu_free: int | None = None, cache_type_k: str = "f16", cache_type_v: str = "f16",
              mmap: bool | None = None, n_seq: int = 1, flash_attn: bool = True) -> Plan:
    """Plan ``path`` at ``n_ctx`` (default: min(trained context, 4096)).

    GPU layers are the most that fit in the devices' free memory (capped by
    ``gpu_memory``, the brief's ``max_memory``) after the compute buffer and
    a driver headroom; what stays on the CPU must fit in available RAM.
    ``offload`` and ``gpu_free`` override what the llama.cpp build reports (tests, what-ifs).
    ``mmap``: the weights mapped or read into memory; None: what loading does (:func:`weights_mapped`).
    ``n_ctx`` is the whole context, all ``n_seq`` sequences together. ``path`` may be a header already read.
    ``flash_attn=False``: llama.cpp's flash attention off (``auto`` turns it on), which holds the scores.

    Example:
        >>> make_plan("m.gguf", n_ctx=2048, gpu_memory=2 * 2**30).gpu_layers   # doctest: +SKIP
        0
    """
    h = path if isinstance(path, Header) else read_header(path)
    path = h.path
    n_layer = int(h.get("block_count", 0))
    trained = int(h.get("context_length", 0) or 0)
    n_ctx = n_ctx or default_context(trained)  # planning past the trained length is allowed (a what-if)
    cpu = _this_cpu()
    ram = ram_available if ram_available is not None else hardware.memory()["available"]
    # a smaller context or quant that fits would be loaded as auto loads what fits: read where huge pages exist
    fit_mmap = (not hardware.weights_in_memory()) if mmap is None else mmap
    if mmap is None:  # what loading does: read where huge pages back the weights and the model fits
        mmap = weights_mapped(h, n_ctx, n_seq=n_seq, ram=ram, cpu=cpu, cache_type_k=cache_type_k,
                              cache_type_v=cache_type_v, flash_attn=flash_attn)
    kv: dict[str, Any] = {"cache_type": cache_type_k, "cache_type_v": cache_type_v, "mmap": mmap, "n_seq": n_seq,
                          "flash_attn": flash_attn}
    est = estimate(h, n_ctx, n_ubatch=n_ubatch, cpu=cpu, **kv)
    reasons: list[str] = []
    if trained and n_ctx > trained:
        reasons.append(f"--ctx {n_ctx} is more than the {trained} tokens the model was trained on")
    if offload is None or gpu_free is None:
        has, free = _devices_free()
        offload = has if offload is None else offload
        gpu_free = free if gpu_free is None else gpu_free
    budget = 0
    if not offload:
        reasons.append("auto = 0 GPU layers: this llama.cpp build has no GPU offload (CPU only)")
    else:
        budget = min(gpu_free, gpu_memory) if gpu_memory is not None else gpu_free
        budget = max(budget - _GPU_HEADROOM, 0)
    gpu_layers = 0
    if budget:
        for g in range(n_layer + 1, 0, -1):
            if split(est, g)[1] <= budget:
                gpu_layers = g
                break
        limit = "--gpu-memory" if gpu_memory is not None and gpu_memory < gpu_free else "free GPU memory"
        what = f"the output head and {gpu_layers - 1} of {n_layer} layers" if gpu_layers else "no layer"
        reasons.append(f"{what} {'fit' if gpu_layers else 'fits'} in "
                       f"{budget / 2**30:.2f} GiB ({limit} less {_GPU_HEADROOM // 2**20} MiB headroom)")
    elif offload:
        reasons.append("no layer fits in the GPU memory given: all layers stay on the CPU")
    ram_need, vram = split(est, gpu_layers)
    fits = ram_need <= ram
    plan = Plan(path=str(path), n_ctx=est.n_ctx, n_layer=n_layer, weights_bytes=est.weights_bytes,
                layer_bytes=est.layer_bytes, non_layer_bytes=est.non_layer_bytes, kv_bytes=est.kv_bytes,
                compute_bytes=est.compute_resident_bytes if not gpu_layers else est.compute_reserved_bytes,
                total_bytes=ram_need + vram, ram_available=ram, gpu_free=gpu_free, gpu_layers=gpu_layers,
                fits=fits, reasons=reasons, ram_bytes=ram_need, vram_bytes=vram, repack_bytes=est.repack_bytes,
                vocab_bytes=est.vocab_bytes, output_bytes=est.output_bytes,
                compute_reserved_bytes=est.compute_reserved_bytes, file_bytes=est.file_bytes, quant=h.quant,
                parameters=h.parameters, mmap=mmap)
    if not fits:
        reasons.append(f"needs {ram_need / 2**20:.0f} MiB of RAM but {ram / 2**20:.0f} MiB is available")
        plan.max_ctx_that_fits = _largest_ctx(h, ram, gpu_layers, n_ubatch, cpu, trained or n_ctx,
                                              {**kv, "mmap": fit_mmap})
        if plan.max_ctx_that_fits:
            reasons.append(f"a context of {plan.max_ctx_that_fits} tokens would fit")
        fit_est = est if fit_mmap == mmap else estimate(h, n_ctx, n_ubatch=n_ubatch, cpu=cpu, **{**kv, "mmap": fit_mmap})
        plan.alternatives = _other_quants(h, fit_est, ram, n_ctx, cpu)
        if plan.alternatives:
            reasons.append("smaller quants that would fit at this context: "
                           + ", ".join(a["quant"] for a in plan.alternatives))
        elif not plan.max_ctx_that_fits:
            reasons.append(_nothing_fits(h, fit_est, ram))
    return plan


def _nothing_fits(h: Header, est: Estimate, ram: int) -> str:
    """What to say when no context and no quant of this model fits: the smallest quant's need,
    and the size of model that would fit at this file's quant (with this model's other memory)."""
    smallest = ALTERNATIVES[-1]
    params = h.parameters or 1
    others = est.ram_bytes - est.weights_resident_bytes
    need = others + int(params * QUANTS[smallest].bpw / 8)
    bpw_now = est.weights_bytes * 8 / params
    fit = max(ram - others, 0) * 8 / bpw_now
    return (f"no quant of it fits: even {smallest} would need {need / 2**30:.1f} GiB; this memory holds a "
            f"model of about {fit / 1e9:.1f} B parameters at {h.quant or 'this quant'}")


def _largest_ctx(h: Header, ram: int, gpu_layers: int, n_ubatch: int, cpu: dict[str, Any], cap: int,
                 kv: dict[str, Any]) -> int | None:
    lo, hi = 0, cap // 256  # in units of 256 tokens (llama.cpp's padding)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if split(estimate(h, mid * 256, n_ubatch=n_ubatch, cpu=cpu, **kv), gpu_layers)[0] <= ram:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256 if lo else None


def _other_quants(h: Header, est: Estimate, ram: int, n_ctx: int, cpu: dict[str, Any]) -> list[dict[str, Any]]:
    """Quants smaller than this file whose estimated RAM at ``n_ctx`` fits (weights scaled by bits per weight)."""
    params = h.parameters or 1
    bpw_now = est.weights_bytes * 8 / params
    out = []
    for q in ALTERNATIVES:
        bpw = QUANTS[q].bpw
        if bpw >= bpw_now * 0.95:
            continue
        weights = int(params * bpw / 8)
        # the other quant's weights replace these (mapped: with this file's header and vocabulary)
        need = est.ram_bytes - est.weights_resident_bytes + weights + (est.file_bytes - est.weights_bytes) * est.mmap
        if need <= ram:
            out.append({"quant": q, "ram_bytes": need})
    return out


__all__ = ["Estimate", "Plan", "estimate", "kv_layout", "make_plan", "split", "weights_mapped", "ALTERNATIVES"]
