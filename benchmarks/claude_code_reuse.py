"""Prefix reuse over a recorded Claude Code-style session, turn by turn.

Replays ``tests/fixtures/claude_code_session.json`` against a live ``localllm serve`` started
here: request k sends the first 2k+1 messages, with a fresh ``cch=`` hash in the billing header
that Claude Code puts first in its system prompt on every request, and the ``cache_control``
breakpoint moved to the newest message, as Claude Code does. Two kinds, in alternating order
each round, each on a server of its own (a cold cache):

* ``as sent``: the header as Claude Code sends it (the server drops it);
* ``header kept``: the same header with a leading space, which the server does not recognise,
  so it stays in the prompt (what a server that keeps it sees).

Prints, per turn, the prompt tokens, those read from the prompt cache (Anthropic's
``cache_read_input_tokens``) and the time to the answer; then the share reused over turns 2+.

Usage:
    python benchmarks/claude_code_reuse.py [--model smollm2-135m] [--rounds 2]

Not run in CI.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import secrets
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serverutil import post, serve_process  # noqa: E402

SESSION = json.loads((ROOT / "tests" / "fixtures" / "claude_code_session.json").read_text())


def turn(k: int, keep_header: bool) -> dict:
    s = copy.deepcopy(SESSION)
    header = s["system"][0]["text"].format(cch=secrets.token_hex(3)[:5])
    s["system"][0]["text"] = (" " + header) if keep_header else header
    msgs = s["messages"][: 2 * k + 1]
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    msgs.insert(1, s["context_message"])
    return {"model": "claude-sonnet-4-5", "max_tokens": 8, "temperature": 0, "system": s["system"],
            "tools": s["tools"], "messages": msgs, **s["fields"]}


def replay(url: str, keep_header: bool) -> list[tuple[int, int, float]]:
    out = []
    for k in range(len(SESSION["messages"]) // 2 + 1):
        t = time.perf_counter()
        r = post(url + "/v1/messages", json=turn(k, keep_header), timeout=600)
        dt = time.perf_counter() - t
        assert r.status_code == 200, r.text
        u = r.json()["usage"]
        out.append((u["input_tokens"] + u["cache_read_input_tokens"], u["cache_read_input_tokens"], dt))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    a = ap.parse_args()
    results: dict[str, list[list[tuple[int, int, float]]]] = {"as sent": [], "header kept": []}
    for r in range(a.rounds):
        kinds = ["as sent", "header kept"] if r % 2 == 0 else ["header kept", "as sent"]
        for kind in kinds:
            with serve_process(a.model, "--parallel", "1", "--ctx", str(a.ctx), "--no-prompt-cache",
                               "--alias", f"claude-*={a.model}") as live:
                results[kind].append(replay(live.url, kind == "header kept"))
    print(f"# {a.model}, {platform.processor() or platform.machine()}, {a.rounds} rounds, medians")
    for kind, runs in results.items():
        print(f"\n## {kind}\n| turn | prompt tokens | read from cache | seconds |\n|---|---|---|---|")
        reused = total = 0
        for k in range(len(runs[0])):
            n = runs[0][k][0]
            cached = statistics.median(run[k][1] for run in runs)
            secs = statistics.median(run[k][2] for run in runs)
            print(f"| {k + 1} | {n} | {cached:g} | {secs:.2f} |")
            if k:
                reused += cached
                total += n
        print(f"\nturns 2+: {reused / total:.1%} of the prompt tokens read from the cache")


if __name__ == "__main__":
    main()
