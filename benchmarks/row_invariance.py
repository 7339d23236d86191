"""Do llama.cpp's CPU kernels give a row the same logits whatever the batch around it?

    python benchmarks/row_invariance.py [--models smollm2-135m smollm2-135m:q4_0 gemma3-270m]
                                        [--questions pieces verify beside]

Three questions, each with flash attention auto (on, on a CPU) and off, on random tokens:

* prompt pieces: the last token's logits after a 300-token prompt decoded in one
  piece, against the same prompt in other pieces ([200,100], [256,44], ...), and
  after a prefix decoded one token at a time. Why prompts are decoded in canonical
  chunks (docs/performance.md, "Exact");
* verification rows: after an 800-token prefix, 24 tokens decoded one at a time
  against in batches of 2..13 with logits for every row (what speculative decoding
  verifies). Why ``--speculate`` is not token-identical and stays opt-in;
* a chunk beside a row: in a context of two KV streams (the scheduler's), a 512-token
  canonical chunk of one sequence decoded in the same ``llama_decode`` as one token of
  another sequence, against the chunk decoded alone: the logits of a token decoded after
  the chunk (so its KV is compared too). llama.cpp splits such a batch into equal
  micro-batches over consecutive sequence ids, so the chunk either shares its first
  micro-batch with the row ("shares": split 1+1, 511) or, when the row's sequence id is
  not the next one, keeps a micro-batch of its own ("own micro-batch"). Why
  ``--prefill exact`` puts the decode rows beside a chunk only with flash attention off
  (localllm/core/prefill.py). Also the time of the two ways (median of 2).

Prints which are bit-equal. Not run in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _ctx(runtime, m, fa):
    return runtime.Context(m, n_ctx=2048, n_threads=2, n_seq_max=1, kv_unified=False, flash_attn=fa)


def _feed(runtime, ctx, b, toks, start, pieces, all_rows=False):
    """Decode ``toks`` from ``start`` in ``pieces``; the logits of the rows asked for."""
    out, pos = [], start
    for n in pieces:
        b.clear()
        rows = [b.add(t, pos + j, 0, all_rows or j == n - 1) for j, t in enumerate(toks[pos - start:pos - start + n])]
        ctx.decode(b)
        out += [ctx.logits(r).copy() for r in (rows if all_rows else rows[-1:])]
        pos += n
    return out


def prompt_pieces(runtime, m, fa, toks) -> list[str]:
    b = runtime.Batch(1024, 1)
    splits = {"[200,100]": [200, 100], "[100,100,100]": [100] * 3, "[256,44]": [256, 44],
              "[64,64,64,64,44]": [64] * 4 + [44], "200 single + [100]": [1] * 200 + [100]}
    c = _ctx(runtime, m, fa)
    ref = _feed(runtime, c, b, toks, 0, [300])[-1]
    c.close()
    res = []
    for name, pieces in splits.items():
        c = _ctx(runtime, m, fa)
        got = _feed(runtime, c, b, toks, 0, pieces)[-1]
        c.close()
        res.append(f"{name} {'=' if np.array_equal(ref, got) else f'max diff {np.abs(ref - got).max():.3g}'}")
    b.close()
    return res


def verify_rows(runtime, m, fa, toks) -> list[str]:
    b = runtime.Batch(1024, 1)
    prefix, gen = toks[:800], toks[800:824]
    res = []
    c = _ctx(runtime, m, fa)
    _feed(runtime, c, b, prefix, 0, [400, 400])
    single = _feed(runtime, c, b, gen, 800, [1] * 24, all_rows=True)
    c.close()
    for k in (2, 4, 6, 13):
        c = _ctx(runtime, m, fa)
        _feed(runtime, c, b, prefix, 0, [400, 400])
        batched = _feed(runtime, c, b, gen, 800, [k] * (24 // k) + ([24 % k] if 24 % k else []), all_rows=True)
        c.close()
        res.append(f"batches of {k}: {sum(np.array_equal(x, y) for x, y in zip(single, batched))}/24 rows equal")
    b.close()
    return res


def _beside_once(runtime, m, fa, toks, order):
    """Stream ``order[0]`` holds a 40-token answer-in-progress, ``order[1]`` a 512-token prefix;
    decode ``order[1]``'s next 512-token chunk (alone, or with one token of ``order[0]`` in the same
    llama_decode: "row first" or "chunk first" in the batch), then one token of ``order[1]``
    alone. Returns (its logits, the chunk step's seconds)."""
    import time

    row_seq, chunk_seq = order[:2]
    how = order[2]
    c = runtime.Context(m, n_ctx=2048 * 2, n_threads=2, n_batch=1024, n_ubatch=512, n_seq_max=2,
                        kv_unified=False, flash_attn=fa)
    b = runtime.Batch(1024, 1)
    b.clear()
    for j, t in enumerate(toks[:40]):
        b.add(t, j, row_seq, False)
    c.decode(b)
    b.clear()
    for j, t in enumerate(toks[40:552]):
        b.add(t, j, chunk_seq, False)
    c.decode(b)
    chunk = toks[552:1064]

    def add_chunk():
        for j, t in enumerate(chunk):
            b.add(t, 512 + j, chunk_seq, False)

    t0 = time.perf_counter()
    b.clear()
    if how == "alone":
        add_chunk()
        c.decode(b)
        b.clear()
        b.add(toks[1064], 40, row_seq, True)
        c.decode(b)
    elif how == "row first":
        b.add(toks[1064], 40, row_seq, True)
        add_chunk()
        c.decode(b)
    else:
        add_chunk()
        b.add(toks[1064], 40, row_seq, True)
        c.decode(b)
    dt = time.perf_counter() - t0
    b.clear()
    r = b.add(toks[1065], 1024, chunk_seq, True)
    c.decode(b)
    out = c.logits(r).copy()
    b.close()
    c.close()
    return out, dt


def beside(runtime, m, fa, toks) -> list[str]:
    import statistics

    res = []
    for row_seq, chunk_seq in ((0, 1), (1, 0)):
        ref, _ = _beside_once(runtime, m, fa, toks, (row_seq, chunk_seq, "alone"))
        times = {k: [] for k in ("alone", "row first", "chunk first")}
        got = {}
        for _ in range(2):
            for how in times:
                got[how], dt = _beside_once(runtime, m, fa, toks, (row_seq, chunk_seq, how))
                times[how].append(dt)
        for how in ("row first", "chunk first"):
            # split_equal: the row's sequence joins the chunk's first micro-batch when it is the chunk's
            # id + 1 (chunk first) or the chunk's is the row's + 1 (row first)
            shares = (chunk_seq == row_seq + 1) if how == "row first" else (row_seq == chunk_seq + 1)
            eq = "=" if np.array_equal(ref, got[how]) else f"max diff {np.abs(ref - got[how]).max():.3g}"
            res.append(f"row seq {row_seq}, chunk seq {chunk_seq}, {how} "
                       f"({'shares' if shares else 'own micro-batch'}): {eq}")
        res.append("time " + ", ".join(f"{k} {statistics.median(v) * 1e3:.1f} ms" for k, v in times.items()))
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "smollm2-135m:q4_0", "gemma3-270m"])
    ap.add_argument("--questions", nargs="*", default=["pieces", "verify", "beside"],
                    choices=["pieces", "verify", "beside"])
    a = ap.parse_args()
    from localllm import runtime, store, resolve

    toks = [int(x) for x in np.random.default_rng(0).integers(100, 30000, 1100)]
    for name in a.models:
        m = runtime.LlamaModel(resolve.resolve(name))
        for fa_name, fa in (("auto", None), ("off", False)):
            print(f"{name}, flash attention {fa_name}")
            if "pieces" in a.questions:
                print("  prompt pieces vs one piece: " + "; ".join(prompt_pieces(runtime, m, fa, toks[:300])))
            if "verify" in a.questions:
                print("  verification rows vs single tokens: " + "; ".join(verify_rows(runtime, m, fa, toks[:824])))
            if "beside" in a.questions:
                print("  a chunk beside another sequence's row vs alone: " + "\n    ".join([""] + beside(runtime, m, fa, toks)),
                      flush=True)
        m.close()


if __name__ == "__main__":
    main()
