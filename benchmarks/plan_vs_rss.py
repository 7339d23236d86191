"""``localllm plan`` against the measured RSS growth of loading a GGUF, mapped and read, at several contexts.

The measurement is the planner test's (tests/checks/test_plan.py: a fresh process loads the file,
creates the context and decodes a 512-token batch); this runs it on any file, e.g. a real-shaped 1B:

    python benchmarks/plan_vs_rss.py MODEL.gguf [--ctx 4096,32768]

Prints a markdown table. Not run in CI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--ctx", default="4096,32768")
    a = ap.parse_args()
    from localllm import plan, resolve
    from tests.checks.test_plan import measure

    path = Path(resolve.resolve(a.model))
    print("| file | context | weights | measured | `plan` | error |\n|---|---|---|---|---|---|")
    for n_ctx in (int(x) for x in a.ctx.split(",")):
        for mmap in (True, False):
            got = measure(path, n_ctx, mmap)
            want = plan.make_plan(path, n_ctx=n_ctx, offload=False, gpu_free=0, mmap=mmap).ram_bytes
            print(f"| {path.name} | {n_ctx:,} | {'mapped' if mmap else 'read'} | {got / 2**20:,.0f} MiB "
                  f"| {want / 2**20:,.0f} MiB | {100 * (want - got) / got:+.1f} % |", flush=True)


if __name__ == "__main__":
    main()
