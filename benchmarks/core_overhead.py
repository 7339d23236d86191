"""The Python cost per token of the generation core (scheduler step, sampling,
detokenizing, stop strings, events, Model.stream), with llama.cpp's decode
replaced by a no-op and the logits by a fixed row: what is left is ours.

    python benchmarks/core_overhead.py [--tokens 2000] [--rounds 5]

Prints the median microseconds per generated token over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()

    from localllm import Model, runtime

    m = Model(a.model, n_ctx=a.tokens + 256, prompt_cache=False)
    row = np.zeros(m.info.n_vocab, dtype=np.float32)
    row[m.tokenize(" hello", add_bos=False)[0]] = 5.0  # greedy picks one ordinary token every time
    runtime.Context.decode = lambda self, batch: None  # type: ignore[method-assign]
    runtime.Context.logits = lambda self, i: row  # type: ignore[method-assign]
    per_token = []
    for _ in range(a.rounds):
        m.reset()
        t0 = time.perf_counter()
        n = sum(1 for _ in m.stream("Once upon a time", max_tokens=a.tokens, temperature=0))
        per_token.append((time.perf_counter() - t0) / n * 1e6)
    print(f"{a.model}: {statistics.median(per_token):.1f} us of Python per token "
          f"(median of {a.rounds} rounds of {a.tokens} tokens; range {min(per_token):.1f}-{max(per_token):.1f})")


if __name__ == "__main__":
    main()
