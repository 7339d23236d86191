"""Where a prompt's time goes: llama-bench's 200-token prompt, our runtime's bare ``llama_decode``
of 200 tokens (the file mapped, and read into memory), and ``Model``'s time to first token.

    python benchmarks/prompt_vs_native.py MODEL.gguf [--rounds 4] [--threads 2]

All four in alternating order each round (this VM's speed drifts by 20 % over minutes); prints each
round's times, the medians, and llama-bench's time over our first token per round (> 1: ours sooner).
The difference between the bare decode and the first token is what ``Model`` adds on top of llama.cpp
(one more step: a prompt's last token goes in with the generated rows). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import build, repack_flags  # noqa: E402

N = 200
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()


def native(bench: Path, path: str, threads: int) -> float:
    """Seconds llama-bench takes for an N-token prompt (the mean of two, after its warm-up)."""
    out = subprocess.run([str(bench), *repack_flags("llama-bench"), "-m", path, "-t", str(threads), "-p", str(N),
                          "-n", "0", "-r", "2", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return N / float(json.loads(out)[0]["avg_ts"])


def bare(path: str, threads: int, mmap: bool) -> float:
    """Seconds of one ``llama_decode`` of N tokens in a fresh model and context (the best of two, after one)."""
    from localllm import runtime

    m = runtime.LlamaModel(path, use_mmap=mmap)
    ctx = runtime.Context(m, n_ctx=1024, n_threads=threads)
    b = runtime.Batch(N)
    times = []
    try:
        for r in range(3):
            ctx.clear()
            b.clear()
            for i in range(N):
                b.add(100 + (7 * i + r) % 1000, i, 0, i == N - 1)
            t = time.perf_counter()
            ctx.decode(b)
            times.append(time.perf_counter() - t)
    finally:
        b.close()
        ctx.close()
        m.close()
    return min(times[1:])


def first_token(model, threads: int) -> float:
    """``Model``'s time to first token for a fresh N-token prompt (the best of two)."""
    times = []
    for i in range(2):
        text = f"{i} " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(2 * N))
        prompt = model.detokenize(model.tokenize(text, add_bos=False)[:N])
        model.reset()  # no prefix reuse
        times.append(model.complete(prompt, max_tokens=1, temperature=0).time_to_first_token_s)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from localllm import Model

    bench = build("llama-bench")["llama-bench"]
    res: dict[str, list[float]] = {"llama-bench": [], "Model first token": [], "bare, mapped": [], "bare, read": []}
    with Model(a.model, n_ctx=1024, n_threads=a.threads, prompt_cache=False) as m:
        m.complete("hello", max_tokens=2)  # warm up
        steps = [("llama-bench", lambda: native(bench, a.model, a.threads)),
                 ("Model first token", lambda: first_token(m, a.threads)),
                 ("bare, mapped", lambda: bare(a.model, a.threads, True)),
                 ("bare, read", lambda: bare(a.model, a.threads, False))]
        for r in range(a.rounds):
            for name, f in (steps if r % 2 == 0 else steps[::-1]):
                res[name].append(f())
            print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in res.items()), flush=True)
    print("median: " + ", ".join(f"{k} {statistics.median(v) * 1000:.0f} ms" for k, v in res.items()))
    ratios = [n / t for n, t in zip(res["llama-bench"], res["Model first token"])]
    print(f"llama-bench / our first token: {statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
