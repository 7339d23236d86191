"""How long one ``llama_decode`` of n tokens takes at a given depth, flash attention on and off.

llama.cpp's CPU flash-attention kernel takes a tiled path only for batches of 32+ query tokens; this
measures what that means for decode (n = 1), ``--prefill fair``'s small pieces and full chunks, in
one process on one sequence (docs/serve.md#fairness has a run).

    python benchmarks/attention_depth.py [--model smollm2-135m] [--depths 0,2048] [--sizes 1,4,16,32,64,512]

Prints ms per decode (the median of 3) for each flash attention setting. Not run in CI.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def curve(path: str, flash_attn: bool, depths: list[int], sizes: list[int], threads: int) -> dict[tuple[int, int], float]:
    from localllm import runtime

    m = runtime.LlamaModel(path, n_gpu_layers=0, use_extra_bufts=runtime.extra_buffers_usable(), use_mmap=False)
    out: dict[tuple[int, int], float] = {}
    try:
        for depth in depths:  # a fresh context each: the measured batches start at this depth
            ctx = runtime.Context(m, n_ctx=depth + 3 * sum(sizes) + 256, n_threads=threads, n_batch=512,
                                  n_ubatch=512, n_seq_max=1, kv_unified=False, flash_attn=flash_attn)
            batch, pos = runtime.Batch(512), 0

            def decode(n: int) -> float:
                nonlocal pos
                batch.clear()
                for i in range(n):
                    batch.add(100 + (pos + i) % 1000, pos + i, 0, i == n - 1)
                t = time.perf_counter()
                ctx.decode(batch)
                pos += n
                return time.perf_counter() - t

            try:
                while pos < depth:
                    decode(min(512, depth - pos))
                for n in sizes:
                    out[(depth, n)] = statistics.median(decode(n) for _ in range(3))
            finally:
                ctx.close()
    finally:
        m.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--depths", default="0,2048")
    ap.add_argument("--sizes", default="1,4,16,32,64,512")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    from localllm import resolve

    path = str(resolve.resolve(a.model))
    depths, sizes = [int(x) for x in a.depths.split(",")], [int(x) for x in a.sizes.split(",")]
    rows = {fa: curve(path, fa, depths, sizes, a.threads) for fa in (True, False)}
    print(f"{Path(path).name}, {a.threads} threads: ms per llama_decode of n tokens (median of 3)")
    print("| depth | flash attention | " + " | ".join(f"n={n}" for n in sizes) + " |")
    print("|---|---|" + "---|" * len(sizes))
    for depth in sorted(depths):
        for fa in (True, False):
            cells = " | ".join(f"{rows[fa][(depth, n)] * 1e3:,.1f}" for n in sizes)
            print(f"| {depth} | {'on' if fa else 'off'} | {cells} |")


if __name__ == "__main__":
    main()
