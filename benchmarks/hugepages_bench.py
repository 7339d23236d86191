"""What huge pages for the weights buy (localllm/runtime/_hugepages.py, hardware.weights_in_memory).

    python benchmarks/hugepages_bench.py [--rounds 10] [--tokens 128] [--models ...]

Each model is loaded three times in one process and ``Model.stream`` decodes
with each in turn, the order rotating by round:

- ``mapped``: the file mapped (``mmap=True``), as llama.cpp and llama-bench do;
  the weights llama.cpp repacks (Q4_0, part of Q4_K) sit in huge pages;
- ``read 4K``: read into memory with ``LOCALLLM_HUGEPAGES=0``: small pages;
- ``read huge``: read into memory backed by huge pages (the default where the
  kernel's THP mode is ``madvise`` or ``always``).

Ratios are to ``mapped``: the median of the per-round ratios with their range,
so that this VM's drift in speed cancels out. A 200-token prompt's first token
(median of three) is compared the same way. Each model runs in a fresh process:
in one that has loaded and freed other models, a buffer under 32 MiB (glibc's
largest mmap threshold) can come from memory malloc already holds, which keeps
its small pages (runtime/_hugepages.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_bench import ours_tg as decode, ttft_200 as first_token  # noqa: E402  the same measurements

MODELS = ["smollm2-135m:q8_0", "smollm2-135m:bf16", "smollm2-135m:q4_0", "smollm2-135m:q4_1", "gemma3-270m"]
# (name, mmap, LOCALLLM_HUGEPAGES); read huge first, so its buffers come from fresh memory (runtime/_hugepages.py)
CONFIGS = [("read huge", False, "1"), ("read 4K", False, "0"), ("mapped", True, "1")]


def _load(path: Path, mmap: bool, huge: str, threads: int):
    from localllm import Model

    os.environ["LOCALLLM_HUGEPAGES"] = huge  # read when the model loads
    try:
        return Model(path, n_ctx=1024, n_threads=threads, prompt_cache=False, mmap=mmap)
    finally:
        os.environ.pop("LOCALLLM_HUGEPAGES")


def _ratio(xs: list[float], ys: list[float]) -> str:
    r = [x / y for x, y in zip(xs, ys)]
    return f"{statistics.median(r):.3f} ({min(r):.2f}-{max(r):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one model, in this process
    a = ap.parse_args()

    from localllm import hardware, resolve

    if not a.row:
        print(f"THP mode: {hardware.thp_mode()}")
        print("| model | huge pages, mapped / read | decode tok/s, mapped | read 4K / mapped | read huge / mapped "
              "| 200-token prompt speed, read huge / mapped |")
        print("|---|---|---|---|---|---|", flush=True)
        for ref in a.models:
            subprocess.run([sys.executable, __file__, "--row", "--models", ref, "--rounds", str(a.rounds),
                            "--tokens", str(a.tokens), "--threads", str(a.threads)], check=True,
                           stderr=subprocess.DEVNULL)
        return
    for ref in a.models:
        path = resolve.resolve(ref)
        models = {name: _load(path, mmap, huge, a.threads) for name, mmap, huge in CONFIGS}
        marked = {name: m.engine.hugepage_bytes / 2**20 for name, m in models.items()}
        tg: dict[str, list[float]] = {name: [] for name in models}
        ttft: dict[str, list[float]] = {name: [] for name in models}
        for m in models.values():
            decode(m, 16)  # page the weights in
        names = list(models)
        for r in range(a.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                tg[name].append(decode(models[name], a.tokens))
                ttft[name].append(first_token(models[name]))
        for m in models.values():
            m.close()
        print(f"| {ref} | {marked['mapped']:.0f} / {marked['read huge']:.0f} MiB "
              f"| {statistics.median(tg['mapped']):.1f} | {_ratio(tg['read 4K'], tg['mapped'])} "
              f"| **{_ratio(tg['read huge'], tg['mapped'])}** | {_ratio(ttft['mapped'], ttft['read huge'])} |",
              flush=True)


if __name__ == "__main__":
    main()
