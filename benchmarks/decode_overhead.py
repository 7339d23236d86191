"""Where a token's time goes between llama.cpp and ``Model.stream``, measured in one
process on one llama.cpp context, so that nothing but the loop differs.

    python benchmarks/decode_overhead.py [--rounds 12] [--tokens 128] [--models ...]

Four loops decode the same 128 tokens after the same prompt, in alternating order:

- ``C``: llama-bench's own loop (``llama_decode`` + ``llama_synchronize`` back to back),
  compiled from a few lines of C against the wheel's libllama, into a cache dir;
- ``C+gap``: the same with a busy wait after each decode as long as the Python
  between two of our decodes (``--gap-us``): if OpenMP's workers went to sleep in
  that gap, this loop would be slower than ``C``;
- ``Python``: ``llama_decode`` and a greedy argmax through localllm's runtime adapter;
- ``stream``: ``Model.stream``, what a user gets (scheduler, sampling, detokenizing,
  stop strings, events).

Each is reported as tok/s and as the median per-round ratio to ``C`` (with its
range), plus the microseconds per token that ``stream`` adds to ``C``.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import cache_dir, source_dir  # noqa: E402

MODELS = ["smollm2-135m:q4_0", "smollm2-135m:q8_0", "smollm2-135m:bf16", "gemma3-270m"]
PROMPT = ", ".join(str(i) for i in range(1, 41)) + ","  # every model here keeps counting: no early EOS

LOOP_C = r"""
#include "llama.h"
#include <time.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
/* llama-bench's generation loop; gap_us of busy waiting after each decode */
double decode_loop(struct llama_context * ctx, int n, int tok, double gap_us) {
    double t0 = now();
    for (int i = 0; i < n; i++) {
        llama_token t = tok;
        if (llama_decode(ctx, llama_batch_get_one(&t, 1))) return -1.0;
        llama_synchronize(ctx);
        if (gap_us > 0) { double end = now() + gap_us * 1e-6; while (now() < end) {} }
        tok = (tok * 7 + 13) % 1000 + 10;
    }
    return n / (now() - t0);
}
"""


def build_loop() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    assert spec is not None and spec.origin
    libdir = Path(spec.origin).parent / "lib"
    out = cache_dir() / "decode_loop"
    lib = out / "libdecodeloop.so"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        (out / "loop.c").write_text(LOOP_C)
        src = source_dir()
        subprocess.run(["gcc", "-O2", "-shared", "-fPIC", f"-I{src / 'include'}", f"-I{src / 'ggml' / 'include'}",
                        str(out / "loop.c"), "-o", str(lib), f"-L{libdir}", "-l:libllama.so.0",
                        f"-Wl,-rpath,{libdir}"], check=True)
    so = ctypes.CDLL(str(lib))
    so.decode_loop.restype = ctypes.c_double
    so.decode_loop.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_double]
    return so


def measure(ref: str, rounds: int, n: int, gap_us: float, loop: ctypes.CDLL) -> None:
    from localllm import Model, runtime

    m = Model(ref, n_ctx=1024, n_threads=2, prompt_cache=False)
    eng = m.engine
    ctx = eng.scheduler.ctx  # the context Model.stream decodes with (a benchmark of the core's loop)
    ids = m.tokenize(PROMPT)
    batch = runtime.Batch(len(ids))

    def prefill() -> int:
        eng.forget()
        ctx.clear()
        batch.clear()
        for i, t in enumerate(ids):
            batch.add(t, i, 0, i == len(ids) - 1)
        ctx.decode(batch)
        return int(ctx.logits(len(ids) - 1).argmax())

    def c_loop(gap: float) -> float:
        tok = prefill()
        return loop.decode_loop(ctypes.cast(ctx.ptr, ctypes.c_void_p), n, tok, gap)

    def py_loop() -> float:
        tok, pos = prefill(), len(ids)
        t0 = time.perf_counter()
        for _ in range(n):
            batch.clear()
            batch.add(tok, pos, 0, True)
            pos += 1
            ctx.decode(batch)
            tok = int(ctx.logits(0).argmax())
        return n / (time.perf_counter() - t0)

    def stream() -> float:
        eng.forget()
        for _ in m.stream(PROMPT, max_tokens=n, temperature=0):
            pass
        return m.last.generation_tokens_per_s

    loops = {"C": lambda: c_loop(0.0), "C+gap": lambda: c_loop(gap_us), "Python": py_loop, "stream": stream}
    for f in loops.values():
        f()  # warm up
    res: dict[str, list[float]] = {k: [] for k in loops}
    for r in range(rounds):
        for k in (list(loops) if r % 2 == 0 else list(loops)[::-1]):
            res[k].append(loops[k]())
    m.close()
    parts = []
    for k, v in res.items():
        rr = [a / b for a, b in zip(v, res["C"])]
        parts.append(f"{k} {statistics.median(v):.1f} ({statistics.median(rr):.3f}, {min(rr):.2f}-{max(rr):.2f})")
    added = statistics.median([1e6 / s - 1e6 / c for s, c in zip(res["stream"], res["C"])])
    print(f"{ref:20s} " + " | ".join(parts) + f" | stream adds {added:.0f} us/token", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--gap-us", type=float, default=150.0)
    ap.add_argument("--models", nargs="*", default=MODELS)
    a = ap.parse_args()
    loop = build_loop()
    print("tok/s (ratio to C, range) per loop")
    for ref in a.models:
        measure(ref, a.rounds, a.tokens, a.gap_us, loop)


if __name__ == "__main__":
    main()
