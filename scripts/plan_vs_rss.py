"""Reproduce docs/plan.md's table: the planner's RAM estimate against the real
RSS growth of loading a model, creating a context and decoding a full
512-token micro-batch (one fresh process per row), with the weights mapped
from the file and read into memory.

    python scripts/plan_vs_rss.py [MODEL ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.checks.test_plan import measure  # noqa: E402  (the same measurement the test makes)

from localllm import plan, resolve  # noqa: E402


def main(models: list[str]) -> None:
    print("| model | weights | n_ctx | estimate MiB | measured MiB | error | KV MiB | repack MiB | vocab MiB "
          "| compute MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ref in models:
        path = resolve.resolve(ref)
        for mmap in (True, False):
            for n_ctx in (512, 4096):
                meas = measure(path, n_ctx, mmap)
                p = plan.make_plan(path, n_ctx=n_ctx, offload=False, gpu_free=0, mmap=mmap)
                mib = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
                print(f"| {ref} | {'mapped' if mmap else 'read'} | {n_ctx} | {mib(p.ram_bytes)} | {mib(meas)} "
                      f"| {(meas - p.ram_bytes) / p.ram_bytes:+.1%} | {mib(p.kv_bytes)} | {mib(p.repack_bytes)} "
                      f"| {mib(p.vocab_bytes)} | {mib(p.compute_bytes)} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["smollm2-135m", "smollm2-135m:q4_0", "gemma3-270m"])
