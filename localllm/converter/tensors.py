"""HF tensor names and layouts → GGUF tensors, one at a time.

:func:`plan_tensors` decides every output tensor (name, shape, type) from the
checkpoint's headers alone; :meth:`OutTensor.compute` then reads and fixes one
tensor when the writer asks for it, so only one tensor is in memory.

Example:
    >>> outs = plan_tensors(ck, rule, cfg, "F16", n_vocab=49152)    # doctest: +SKIP
    >>> outs[0].name                                                # doctest: +SKIP
    'token_embd.weight'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from localllm.converter.checkpoint import Checkpoint, TensorRef, rope_params
from localllm.converter.rules import ArchRule
from localllm.errors import CheckpointError

Q = gguf.GGMLQuantizationType
# output types written directly (with gguf's numpy code); the rest go through llama.cpp
DIRECT_TYPES = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0}
# leftovers of bitsandbytes "merged" checkpoints: data that is not the model
_JUNK = re.compile(r"\.(SCB|absmax|quant_map|quant_state\..*|nested_absmax|nested_quant_map|weight_format)$")


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split RoPE rows → llama.cpp's interleaved rows (Llama/Mistral Q and K).

    Example:
        >>> permute_qk(np.arange(4.0)[:, None], 1).ravel().tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


def llama3_rope_freqs(rp: dict[str, Any], head_dim: int) -> np.ndarray:
    """The per-dimension frequency divisors llama.cpp applies for ``rope_type: llama3``."""
    base = rp["rope_theta"]
    factor = float(rp.get("factor", 8.0))
    low = float(rp.get("low_freq_factor", 1.0))
    high = float(rp.get("high_freq_factor", 4.0))
    old_ctx = float(rp.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    low_wl, high_wl = old_ctx / low, old_ctx / high
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(factor)
        else:
            smooth = (old_ctx / wl - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


@dataclass
class OutTensor:
    """One GGUF tensor to write: where it comes from and how to make it."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows first)
    qtype: gguf.GGMLQuantizationType
    source: TensorRef | None
    fixes: list[Callable[[np.ndarray], np.ndarray]] = field(default_factory=list)
    const: np.ndarray | None = None  # computed tensors (rope_freqs)
    row_local: bool = True  # every fix maps row i to row i (so rows can be converted in chunks)

    @property
    def nbytes(self) -> int:
        return int(np.prod(gguf.quant_shape_to_byte_shape(self.shape, self.qtype)))

    def compute(self, rows: slice | None = None) -> np.ndarray:
        """Read, fix and encode the tensor, or only ``rows`` of it (bytes in
        ``qtype``, ready to write)."""
        if self.const is not None:
            arr = self.const if rows is None else self.const[rows]
        else:
            arr = self.source.load(rows)  # type: ignore[union-attr]
        for fix in self.fixes:
            arr = fix(arr)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if self.qtype == Q.F32:
            return arr
        return gguf.quants.quantize(arr, self.qtype)

    def chunks(self, max_bytes: int = 32 << 20) -> Iterator[np.ndarray]:
        """The encoded tensor in row chunks of about ``max_bytes`` of float32, so
        a large tensor (a 262k-row embedding: 670 MB as f32) never exists whole
        in memory; one chunk when a fix needs the whole tensor (Q/K permutation).

        Example:
            >>> b"".join(c.tobytes() for c in out.chunks()) == out.compute().tobytes()   # doctest: +SKIP
            True
        """
        n_rows = self.shape[0] if len(self.shape) > 1 else 1
        row_f32 = 4 * int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 0
        if not self.row_local or n_rows == 1 or row_f32 * n_rows <= max_bytes:
            yield self.compute()
            return
        step = max(1, max_bytes // row_f32)
        for r in range(0, n_rows, step):
            rows = slice(r, min(r + step, n_rows))
            yield self.compute(rows)
            if self.source is not None:
                self.source.release(rows)  # the mapped pages read so far would count toward RSS


def _keep_f32(gguf_name: str, ndim: int) -> bool:
    # llama.cpp (and its converter) keep 1-D tensors, norms and biases in F32:
    # they are tiny and every matmul-free op on them expects F32
    return ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")


def choose_qtype(gguf_name: str, shape: tuple[int, ...], want: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The type one tensor gets: F32 for small/norm tensors, F16 when a block type
    does not fit its rows (gguf's quantizers need rows divisible by the block)."""
    if _keep_f32(gguf_name, len(shape)):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[want][0]
    if shape[-1] % block:
        return Q.F16
    return want


def expected_shape(name: str, src: str, cfg: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape (numpy order) the config implies for GGUF tensor ``name`` (from
    HF tensor ``src``), or None when the config does not fix it.

    Example:
        >>> expected_shape("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight",
        ...                {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4})
        (64, 128)
    """
    hidden = int(cfg["hidden_size"])
    n_head = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_head)
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    ff = cfg.get("intermediate_size")
    q, k = n_head * head_dim, n_kv * head_dim
    part = name.split(".")[-2] if name.startswith("blk.") else name.rsplit(".", 1)[0]
    bias = name.endswith(".bias")
    rows = {"attn_q": q, "attn_k": k, "attn_v": k, "attn_qkv": q + 2 * k, "attn_output": hidden,
            "ffn_gate": ff, "ffn_up": None if ff is None else int(ff) * (2 if "gate_up" in src else 1),
            "ffn_down": hidden}.get(part)
    if part in ("attn_q_norm", "attn_k_norm"):
        return (head_dim,)
    if part.endswith("_norm") and not bias:
        return (hidden,)
    if rows is None:
        return None
    if bias:
        return (int(rows),)
    cols = {"attn_output": q, "ffn_down": ff}.get(part, hidden)
    return None if cols is None else (int(rows), int(cols))


def plan_tensors(ck: Checkpoint, rule: ArchRule, cfg: dict[str, Any], qtype: gguf.GGMLQuantizationType,
                 *, n_vocab: int) -> list[OutTensor]:
    """Map every checkpoint tensor to its GGUF tensor; raise on anything unknown
    or inconsistent with the config (naming the file)."""
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[rule.gguf_arch]
    n_layer = int(cfg["num_hidden_layers"])
    n_head = int(cfg["num_attention_heads"])
    n_head_kv = int(cfg.get("num_key_value_heads") or n_head)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    tied = cfg.get("tie_word_embeddings")
    tied = rule.tied_default if tied is None else bool(tied)
    names = gguf.get_tensor_name_map(arch, n_layer)
    outs: list[OutTensor] = []
    seen: set[str] = set()
    for ref in ck.tensors.values():
        src = ref.name
        if any(src.endswith(s) for s in rule.skip_suffixes) or _JUNK.search(src):
            continue
        if src == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(src, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"{ref.file}: tensor {src!r} has no GGUF name for {rule.gguf_arch}",
                                  hint="this checkpoint has parts the converter does not know", path=str(ref.file))
        if ref.dtype not in ("F32", "F16", "BF16"):
            raise CheckpointError(f"{ref.file}: tensor {src!r} is {ref.dtype}; only f32/f16/bf16 weights convert",
                                  hint="dequantize the checkpoint first", path=str(ref.file))
        shape = ref.shape
        want = expected_shape(name, src, cfg)
        if want is not None and shape != want:
            raise CheckpointError(
                f"{ref.file}: tensor {src!r} is {list(shape)} but config.json implies {list(want)} "
                f"(hidden_size {hidden}, heads {n_head}/{n_head_kv}, head_dim {head_dim}, "
                f"intermediate_size {cfg.get('intermediate_size')})",
                hint="the weights and config.json do not belong together, or the file is corrupt",
                path=str(ref.file), tensor=src)
        fixes: list[Callable[[np.ndarray], np.ndarray]] = []
        row_local = True
        if rule.permute_qk and re.search(r"\.(attn_q|attn_k)\.(weight|bias)$", name):
            heads = n_head if ".attn_q." in name else n_head_kv
            if shape[0] != heads * head_dim:
                raise CheckpointError(f"{ref.file}: {src} has {shape[0]} rows, config implies {heads}×{head_dim}",
                                      path=str(ref.file))
            fixes.append(lambda a, h=heads: permute_qk(a, h))
            row_local = False
        if rule.norm_plus_one and name.endswith("_norm.weight"):
            fixes.append(lambda a: a + 1.0)
        if name == "token_embd.weight":
            if shape[-1] != hidden:
                raise CheckpointError(f"{ref.file}: {src} is {list(shape)} but hidden_size is {hidden}",
                                      path=str(ref.file))
            if shape[0] > n_vocab and rule.trim_embeddings:
                fixes.append(lambda a, n=n_vocab: a[:n])
                shape = (n_vocab, *shape[1:])
            elif shape[0] < n_vocab:
                raise CheckpointError(f"{ref.file}: {src} has {shape[0]} rows but the tokenizer has {n_vocab} tokens",
                                      path=str(ref.file))
        outs.append(OutTensor(name, shape, choose_qtype(name, shape, qtype), ref, fixes, row_local=row_local))
        seen.add(name)
    if "token_embd.weight" not in seen:
        raise CheckpointError(f"{ck.path}: no embedding tensor (model.embed_tokens.weight) found", path=str(ck.path))
    if not tied and "output.weight" not in seen:
        raise CheckpointError(f"{ck.path}: tie_word_embeddings is false but there is no lm_head.weight",
                              hint="the checkpoint is incomplete", path=str(ck.path))
    for i in range(n_layer):
        if f"blk.{i}.attn_norm.weight" not in seen:
            raise CheckpointError(f"{ck.path}: layer {i} is missing (config says {n_layer} layers)",
                                  hint="a shard is missing or the config is wrong", path=str(ck.path))
    rp = rope_params(cfg)
    if rp.get("rope_type") == "llama3":
        freqs = llama3_rope_freqs(rp, head_dim)
        outs.append(OutTensor("rope_freqs.weight", freqs.shape, Q.F32, None, const=freqs))
    if rp.get("rope_type") in ("longrope", "su"):
        for kind in ("long", "short"):
            f = np.asarray(rp[f"{kind}_factor"], dtype=np.float32)
            outs.append(OutTensor(f"rope_factors_{kind}.weight", f.shape, Q.F32, None, const=f))
    return outs


def hparams(rule: ArchRule, cfg: dict[str, Any]) -> dict[str, Any]:
    """The GGUF hyperparameters (key suffix after ``{arch}.`` → value)."""
    n_head = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // n_head)
    rp = rope_params(cfg)
    rot = int(head_dim * float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
    kv: dict[str, Any] = {
        "context_length": int(cfg.get("max_position_embeddings") or 4096),
        "embedding_length": hidden,
        "block_count": int(cfg["num_hidden_layers"]),
        "feed_forward_length": int(cfg["intermediate_size"]),
        "attention.head_count": n_head,
        "attention.head_count_kv": int(cfg.get("num_key_value_heads") or n_head),
        "attention.layer_norm_rms_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "attention.key_length": head_dim,
        "attention.value_length": head_dim,
        "rope.dimension_count": rot,
        "rope.freq_base": float(rp["rope_theta"]),
    }
    rtype = rp.get("rope_type", "default")
    if rtype in ("linear", "yarn") and rp.get("factor"):
        kv["rope.scaling.type"] = rtype
        kv["rope.scaling.factor"] = float(rp["factor"])
        if rp.get("original_max_position_embeddings"):
            kv["rope.scaling.original_context_length"] = int(rp["original_max_position_embeddings"])
    elif rtype in ("longrope", "su"):
        orig = int(rp.get("original_max_position_embeddings") or cfg.get("original_max_position_embeddings"))
        kv["rope.scaling.original_context_length"] = orig
        scale = kv["context_length"] / orig
        kv["rope.scaling.attn_factor"] = 1.0 if scale <= 1 else math.sqrt(1 + math.log(scale) / math.log(orig))
    if rule.extra_kv:
        kv.update(rule.extra_kv(cfg))
    return kv
