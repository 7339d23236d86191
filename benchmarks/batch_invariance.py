"""Does a greedy request give the same text alone and in a batch?

    python benchmarks/batch_invariance.py [--models smollm2-135m smollm2-135m:q4_0] [--tokens 64] [--rounds 2]

For each model and for repacked and unrepacked weights, 8 prompts are
answered one at a time, then all 8 at once (8 slots, one KV stream per slot),
and the outputs compared. The figures in docs/serve.md come from this.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "My favourite colour is", "Python is a",
           "Once upon a time", "The best way to learn", "Water boils at", "In 1969, the first"]


def main() -> None:
    import logging

    import openai
    from serverutil import live_server

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "smollm2-135m:q4_0"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    print("| model | weights | rounds | prompts whose output changed (of 8) |")
    print("|---|---|---|---|")
    for model in a.models:
        for repack in (True, False):
            with live_server(model=model, parallel=8, ctx=512, max_queue=8, repack=repack) as live:
                c = openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=300)

                def ask(p: str) -> str:
                    return c.completions.create(model=model, prompt=p, max_tokens=a.tokens, temperature=0,
                                                extra_body={"ignore_eos": True}).choices[0].text

                alone = [ask(p) for p in PROMPTS]
                changed = []
                for _ in range(a.rounds):
                    together: list[str] = [""] * len(PROMPTS)
                    ts = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(PROMPTS[i])))
                          for i in range(len(PROMPTS))]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                    changed.append(sum(x != y for x, y in zip(alone, together)))
            print(f"| {model} | {'repacked' if repack else 'not repacked'} | {a.rounds} | "
                  f"{', '.join(map(str, changed))} |", flush=True)


if __name__ == "__main__":
    main()
