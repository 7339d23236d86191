"""What huge pages for llama.cpp's repacked weights buy (localllm/runtime/_hugepages.py).

    python benchmarks/hugepages_bench.py [--rounds 20] [--tokens 128] [--models ...]

Each model is loaded twice in one process, once with ``LOCALLLM_HUGEPAGES=0``
and once without, and ``Model.stream`` decodes with each in turn, the order
alternating by round; the ratio reported is the median of the per-round ratios
(huge / 4 KiB) with their range, so that this VM's drift in speed cancels out.
A 200-token prompt's first token (median of three) is compared the same way. The decode only
gains where llama.cpp repacks the weights (Q4_0 and, partly, Q4_K on x86);
Q8_0 is the control.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_bench import ours_tg as decode, ttft_200 as first_token  # noqa: E402  the same measurements

MODELS = ["smollm2-135m:q4_0", "gemma3-270m", "smollm2-135m:q8_0"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", nargs="*", default=MODELS)
    a = ap.parse_args()

    from localllm import Model, store
    from localllm.runtime import _hugepages

    print(f"THP mode: {_hugepages.thp_mode()}")
    for ref in a.models:
        path = store.resolve(ref)
        models = {}
        for on in (True, False):  # on first: its buffers then come from fresh memory (runtime/_hugepages.py)
            os.environ["LOCALLLM_HUGEPAGES"] = "1" if on else "0"  # read when the model loads
            models[on] = Model(path, n_ctx=1024, n_threads=a.threads, prompt_cache=False)
        os.environ.pop("LOCALLLM_HUGEPAGES")
        marked = models[True]._engine.llama.hugepage_bytes / 2**20
        tg: dict[bool, list[float]] = {False: [], True: []}
        ttft: dict[bool, list[float]] = {False: [], True: []}
        for m in models.values():
            decode(m, 16)  # page the weights in
        for r in range(a.rounds):
            for on in ((False, True) if r % 2 == 0 else (True, False)):
                tg[on].append(decode(models[on], a.tokens))
                ttft[on].append(first_token(models[on]))
        for m in models.values():
            m.close()
        ratios = [h / s for h, s in zip(tg[True], tg[False])]
        pp = [s / h for h, s in zip(ttft[True], ttft[False])]  # speed ratio: >1 is faster
        print(f"{ref:20s} huge pages {marked:5.0f} MiB | decode {statistics.median(tg[False]):6.1f} -> "
              f"{statistics.median(tg[True]):6.1f} tok/s, ratio {statistics.median(ratios):.3f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) | 200-token prompt speed ratio {statistics.median(pp):.3f} "
              f"({min(pp):.2f}-{max(pp):.2f})", flush=True)


if __name__ == "__main__":
    main()
