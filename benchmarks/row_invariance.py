"""Do llama.cpp's CPU kernels give a row the same logits whatever the batch around it?

    python benchmarks/row_invariance.py [--models smollm2-135m smollm2-135m:q4_0 gemma3-270m]

Two questions, each with flash attention auto (on, on a CPU) and off, on random tokens:

* prompt pieces: the last token's logits after a 300-token prompt decoded in one
  piece, against the same prompt in other pieces ([200,100], [256,44], ...), and
  after a prefix decoded one token at a time. Why prompts are decoded in canonical
  chunks (docs/performance.md, "Exact");
* verification rows: after an 800-token prefix, 24 tokens decoded one at a time
  against in batches of 2..13 with logits for every row (what speculative decoding
  verifies). Why ``--speculate`` is not token-identical and stays opt-in.

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "smollm2-135m:q4_0", "gemma3-270m"])
    a = ap.parse_args()
    from localllm import runtime, store, resolve

    toks = [int(x) for x in np.random.default_rng(0).integers(100, 30000, 824)]
    for name in a.models:
        m = runtime.LlamaModel(resolve.resolve(name))
        for fa_name, fa in (("auto", None), ("off", False)):
            print(f"{name}, flash attention {fa_name}")
            print("  prompt pieces vs one piece: " + "; ".join(prompt_pieces(runtime, m, fa, toks[:300])))
            print("  verification rows vs single tokens: " + "; ".join(verify_rows(runtime, m, fa, toks)))
        m.close()


if __name__ == "__main__":
    main()
