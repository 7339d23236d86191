"""A GGUF of a model too large to build here, for planning only: a real file's metadata
(its vocabulary, template, rope settings) with a bigger model's widths and layers, and
tensor entries at Q4_K_M's types whose data region is a hole in a sparse file.

    python benchmarks/sparse_gguf.py SRC.gguf OUT.gguf --like llama-3.1-70b
    localllm plan OUT.gguf --ctx 4096        # what the planner says; nothing is loaded

SRC is a Llama-architecture GGUF (for example the 2-layer Llama-3.2-1B shape that
``shaped_models.py --layers 2`` and ``localllm convert`` give): its 128,256-token
vocabulary is the one Llama-3.1-70B has. The output's size on disk is its header
(a few MB); its length is the whole model's, so the header checks and the planner
see a 70B at 4.5 bits per weight. Loading it would read zeros: it is not for loading.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

# published config.json fields of models too large to build on a laptop
SHAPES: dict[str, dict[str, int]] = {
    "llama-3.1-70b": {"n_layer": 80, "n_embd": 8192, "n_ff": 28672, "n_head": 64, "n_head_kv": 8, "head_dim": 128},
    "llama-3.1-8b": {"n_layer": 32, "n_embd": 4096, "n_ff": 14336, "n_head": 32, "n_head_kv": 8, "head_dim": 128},
}


def layer_bytes(like: str) -> int:
    """Bytes of one layer's tensors at these types, on average (to choose a layer count for a size)."""
    import gguf

    total = 0
    for name, shape, t in _tensors({**SHAPES[like], "n_layer": 2}, 0):
        if name.startswith("blk."):
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t]]
            n = 1
            for d in shape:
                n *= d
            total += n // block * size
    return total // 2


def _tensors(s: dict[str, int], n_vocab: int) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape in ggml order, type) of every tensor, at llama-quantize's Q4_K_M choices
    (Q6_K for the output and for half of the layers' attn_v and ffn_down)."""
    e, f, kv = s["n_embd"], s["n_ff"], s["n_head_kv"] * s["head_dim"]
    out = [("token_embd.weight", (e, n_vocab), "Q4_K"), ("output_norm.weight", (e,), "F32"),
           ("output.weight", (e, n_vocab), "Q6_K"), ("rope_freqs.weight", (s["head_dim"] // 2,), "F32")]
    for i in range(s["n_layer"]):
        big = "Q6_K" if i % 2 == 0 else "Q4_K"
        out += [(f"blk.{i}.attn_norm.weight", (e,), "F32"), (f"blk.{i}.ffn_norm.weight", (e,), "F32"),
                (f"blk.{i}.attn_q.weight", (e, s["n_head"] * s["head_dim"]), "Q4_K"),
                (f"blk.{i}.attn_k.weight", (e, kv), "Q4_K"), (f"blk.{i}.attn_v.weight", (e, kv), big),
                (f"blk.{i}.attn_output.weight", (s["n_head"] * s["head_dim"], e), "Q4_K"),
                (f"blk.{i}.ffn_gate.weight", (e, f), "Q4_K"), (f"blk.{i}.ffn_up.weight", (e, f), "Q4_K"),
                (f"blk.{i}.ffn_down.weight", (f, e), big)]
    return out


def widen(src: Path, out: Path, like: str, *, n_layer: int | None = None) -> int:
    """Write ``out`` (sparse); returns its length in bytes. ``n_layer``: that many layers of
    the model's widths instead of its own count (a size chosen against this machine's RAM)."""
    import gguf
    import numpy as np

    s = dict(SHAPES[like])
    if n_layer:
        s["n_layer"] = n_layer
    r = gguf.GGUFReader(src)
    arch = str(r.fields["general.architecture"].contents())
    if arch != "llama":
        raise SystemExit(f"{src}: a llama GGUF is needed (this one is {arch})")
    new: dict[str, Any] = {"block_count": s["n_layer"], "embedding_length": s["n_embd"],
                           "feed_forward_length": s["n_ff"], "attention.head_count": s["n_head"],
                           "attention.head_count_kv": s["n_head_kv"], "rope.dimension_count": s["head_dim"],
                           "attention.key_length": s["head_dim"], "attention.value_length": s["head_dim"]}
    w = gguf.GGUFWriter(out, arch)
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.name"):
            continue
        short = name.removeprefix(f"{arch}.")
        if short in new:
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for short, v in new.items():
        w.add_key_value(f"{arch}.{short}", v, gguf.GGUFValueType.UINT32)
    w.add_name(f"{like} (sparse, for planning)")
    n_vocab = len(r.fields["tokenizer.ggml.tokens"].data)
    for name, shape, t in _tensors(s, n_vocab):
        qt = gguf.GGMLQuantizationType[t]
        block, size = gguf.GGML_QUANT_SIZES[qt]
        nbytes = int(np.prod(shape)) // block * size
        w.add_tensor_info(name, tuple(reversed(shape)), np.dtype(np.float32), nbytes, raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    start = fout.tell()
    start += -start % w.data_alignment
    length = start + sum(gguf.GGUFWriter.ggml_pad(ti.nbytes, w.data_alignment) for ti in w.tensors[0].values())
    fout.truncate(length)  # a hole: no blocks on disk
    w.close()
    return length


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--like", choices=sorted(SHAPES), default="llama-3.1-70b")
    ap.add_argument("--layers", type=int, help="this many layers of the model's widths")
    a = ap.parse_args()
    n = widen(a.src, a.out, a.like, n_layer=a.layers)
    print(f"{a.out}: {n / 2**30:.1f} GiB long, {a.out.stat().st_blocks * 512 / 2**20:.1f} MiB on disk")


if __name__ == "__main__":
    main()
