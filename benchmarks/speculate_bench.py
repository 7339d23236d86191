"""Prompt-lookup speculative decoding against plain decoding, and against llama.cpp's own
(``llama-lookup``, built from the sdist into the bench cache), in one run.

Two greedy tasks on the default model, each ``--tokens`` long:

* ``copy``: repeat a code file with one rename (the answer copies its prompt);
* ``prose``: a free story (nothing to copy).

Each round measures plain, ``speculate="on"`` and ``llama-lookup`` in alternating
order (a fresh process each, 2 threads); medians and per-round ratios are reported,
with the acceptance rate and whether the text equals plain decoding's.

Usage:
    python benchmarks/speculate_bench.py [--rounds 3] [--tokens 160] [--model smollm2-135m] [--tasks copy prose]

Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = (ROOT / "localllm" / "core" / "lanes.py").read_text()[:2400]
TASKS = {
    "copy": "Repeat this Python code, renaming the class Lane to Feed and changing nothing else.\n\n" + CODE,
    "prose": "Write a long story about a lighthouse keeper who finds a message in a bottle.",
}


def child(model: str, task: str, tokens: int, speculate: str) -> dict:
    from localllm import Model

    with Model(model, n_ctx=4096, speculate=speculate, prompt_cache=False, n_threads=2) as m:
        msgs = [{"role": "user", "content": TASKS[task]}]
        m.chat_complete(msgs, temperature=0, max_tokens=4)  # warm-up
        m.reset()
        t0 = time.perf_counter()
        r = m.chat_complete(msgs, temperature=0, max_tokens=tokens, ignore_eos=True)
        gen_s = time.perf_counter() - t0 - r.time_to_first_token_s
        st = m.engine.stats
        prompt = m.render_chat(msgs)
    return {"tps": (r.completion_tokens - 1) / gen_s, "tokens": r.tokens, "drafted": st["drafted_tokens"],
            "accepted": st["accepted_tokens"], "prompt": prompt}


def run_child(model: str, task: str, tokens: int, speculate: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", task, "--speculate", speculate, "--model", model,
                          "--tokens", str(tokens)], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_lookup(model: str, prompt: str, tokens: int) -> dict:
    """llama.cpp's prompt lookup decoding on the same chat-formatted prompt."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT))
    from native import build

    from localllm import resolve

    exe = build("llama-lookup")["llama-lookup"]
    out = subprocess.run([str(exe), "-m", str(resolve.resolve(model)), "-p", prompt, "-n", str(tokens), "-t", "2",
                          "-c", "4096", "--temp", "0", "--spec-draft-n-max", "12", "--ignore-eos"],
                         capture_output=True, text=True, timeout=1200)
    log = out.stdout + out.stderr
    m = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    acc = re.search(r"n_accept\s*=\s*(\d+)", log)
    drafted = re.search(r"n_drafted\s*=\s*(\d+)", log)
    if not m:
        raise SystemExit("llama-lookup printed no timing:\n" + log[-2000:])
    return {"tps": int(m.group(1)) / float(m.group(2)), "accepted": int(acc.group(1)) if acc else 0,
            "drafted": int(drafted.group(1)) if drafted else 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", default=None)
    ap.add_argument("--speculate", default="off")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.model, a.child, a.tokens, a.speculate)))
        return
    kinds = ["plain", "speculate", "llama-lookup"]
    for task in a.tasks:
        rows: dict[str, list[dict]] = {k: [] for k in kinds}
        for i in range(a.rounds):
            for kind in kinds[i % 3:] + kinds[:i % 3]:
                if kind == "llama-lookup":
                    prompt = rows["plain"][-1]["prompt"] if rows["plain"] else run_child(a.model, task, 2, "off")["prompt"]
                    rows[kind].append(run_lookup(a.model, prompt, a.tokens))
                else:
                    rows[kind].append(run_child(a.model, task, a.tokens, "on" if kind == "speculate" else "off"))
            print(f"{task} round {i + 1}: " + ", ".join(f"{k} {rows[k][-1]['tps']:.1f} tok/s" for k in kinds),
                  file=sys.stderr, flush=True)
        report(task, rows, a)


def report(task: str, rows: dict[str, list[dict]], a: argparse.Namespace) -> None:
    med = {k: statistics.median(r["tps"] for r in v) for k, v in rows.items()}
    ratio = [s["tps"] / p["tps"] for s, p in zip(rows["speculate"], rows["plain"])]
    ratio_ll = [s["tps"] / p["tps"] for s, p in zip(rows["speculate"], rows["llama-lookup"])]
    same = sum(s["tokens"] == p["tokens"] for s, p in zip(rows["speculate"], rows["plain"]))
    first_diff = [next((i for i, (x, y) in enumerate(zip(s["tokens"], p["tokens"])) if x != y), None)
                  for s, p in zip(rows["speculate"], rows["plain"])]
    spec, ll = rows["speculate"][-1], rows["llama-lookup"][-1]
    print(f"\n{task}: {a.tokens} tokens, {a.rounds} rounds, model {a.model}, load average {os.getloadavg()[0]:.1f}")
    print("| | generation tok/s (median) | drafts accepted |")
    print("|---|---|---|")
    print(f"| plain | {med['plain']:.1f} | |")
    print(f"| localllm --speculate on | {med['speculate']:.1f} | {spec['accepted']} of {spec['drafted']} |")
    print(f"| llama-lookup (--spec-draft-n-max 12) | {med['llama-lookup']:.1f} | {ll['accepted']} of {ll['drafted']} |")
    print(f"speculate / plain: {statistics.median(ratio):.2f} (range {min(ratio):.2f}-{max(ratio):.2f}); "
          f"speculate / llama-lookup: {statistics.median(ratio_ll):.2f} (range {min(ratio_ll):.2f}-{max(ratio_ll):.2f})")
    print(f"same tokens as plain decoding in {same} of {len(ratio)} rounds (first difference at token {first_diff})")


if __name__ == "__main__":
    main()
