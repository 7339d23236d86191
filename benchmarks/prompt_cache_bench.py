"""Time to first token after a restart, with the prompt cache on disk and without it.

Every measurement is a fresh process (a restart): it loads the model and asks
one chat question under a fixed system prompt of about 1,000 tokens. Three
kinds, in alternating order each round:

* ``off``: ``Model(prompt_cache=False)``: the whole prompt is decoded;
* ``cold``: the cache on, its folder empty: the whole prompt is decoded and the
  state saved at the end (what the cache costs when it does not help);
* ``warm``: the cache on, its folder holding an earlier conversation with the same
  system prompt and another question: the system prompt comes from disk;
* ``llama-server``: llama.cpp's own server (built from the sdist into the bench
  cache), started fresh, asked the question with ``cache_prompt`` (its prompt
  cache lives in memory, so a restart loses it), then, as its best case, another
  question with the same system prompt on the same process (``llama-server, in memory``).

Reports medians and the per-round ratios (median and range) side by side.

Usage:
    python benchmarks/prompt_cache_bench.py --rounds 5 [--model smollm2-135m] [--json out.json]
    python benchmarks/prompt_cache_bench.py --rules 125 --ctx 6144 --model M   # a ~4,000-token system prompt

Not run in CI. Writes only to a temporary folder.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def system(rules: int) -> str:
    """The shared system prompt: about 32 tokens a rule (31 rules: ~1,000 tokens; 125: ~4,000)."""
    return ("You are the support assistant of a hardware shop. Follow these rules. "
            + " ".join(f"Rule {i}: when asked about product {i * 13}, give its price, say it ships in {i % 5 + 1} "
                       f"days, and never promise a discount." for i in range(rules)))


SYSTEM = system(31)
RULES, CTX = [31], [2048]  # set by --rules / --ctx (children get them as arguments)


def child(mode: str, folder: str, model: str | None, question: str, ctx: int = 2048) -> dict[str, float]:
    from localllm import Model

    t0 = time.perf_counter()
    pc: bool | str = False if mode == "off" else folder
    with Model(model, n_ctx=ctx, prompt_cache=pc) as m:
        load = time.perf_counter() - t0
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        t = time.perf_counter()
        r = m.chat_complete(msgs, temperature=0, max_tokens=8)
        total = time.perf_counter() - t
    return {"ttft": r.time_to_first_token_s, "total": total, "cached": r.cached_tokens,
            "prompt": r.prompt_tokens, "load": load}


def run_child(mode: str, folder: Path, model: str | None, question: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", mode, "--folder", str(folder), "--question", question,
           "--rules", str(RULES[0]), "--ctx", str(CTX[0])]
    if model:
        cmd += ["--model", model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stream_ttft(port: int, question: str) -> float:
    """Seconds to the first content of a streamed chat answer from llama-server."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
                       "max_tokens": 8, "temperature": 0, "stream": True, "cache_prompt": True})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    resp, first = conn.getresponse(), float("nan")
    for line in resp:
        if line.startswith(b"data: {") and first != first:
            delta = json.loads(line[6:])["choices"][0].get("delta") or {}
            if delta.get("content"):
                first = time.perf_counter() - t0
    conn.close()
    return first


def run_llama_server(model: str | None, question: str) -> dict[str, float]:
    """A fresh llama-server: the question (nothing cached), then another one (the system prompt in memory)."""
    sys.path.insert(0, str(ROOT))
    from native import build, repack_flags
    from serve_bench import free_port, wait_healthy

    from localllm import store, resolve

    exe = build("llama-server")["llama-server"]
    port = free_port()
    cmd = [str(exe), "-m", str(resolve.resolve(model or "smollm2-135m")), "-t", "2", "-tb", "2", "-np", "1",
           "-c", str(CTX[0]), "--host", "127.0.0.1", "--port", str(port), "--no-webui", *repack_flags("llama-server")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc)
        # another question on the same process: only the system prompt is shared
        return {"ttft": _stream_ttft(port, question),
                "ttft_mem": _stream_ttft(port, "How long does product 7 take to ship?")}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None)
    ap.add_argument("--folder", default=None)
    ap.add_argument("--question", default="What does product 26 cost?")
    ap.add_argument("--rules", type=int, default=31, help="system prompt size: ~32 tokens a rule")
    ap.add_argument("--ctx", type=int, default=2048)
    a = ap.parse_args()
    global SYSTEM
    SYSTEM, RULES[0], CTX[0] = system(a.rules), a.rules, a.ctx
    if a.child:
        print(json.dumps(child(a.child, a.folder, a.model, a.question, a.ctx)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="localllm-pcbench-"))
    try:
        warm = tmp / "warm"
        run_child("warm", warm, a.model, "Hello, who are you?")  # an earlier conversation, not timed
        rows: dict[str, list[dict[str, float]]] = {"off": [], "cold": [], "warm": [], "llama-server": []}
        kinds = list(rows)
        for i in range(a.rounds):
            order = kinds[i % 4:] + kinds[:i % 4]
            question = f"What does product {13 * (i + 2)} cost?"
            for kind in order:
                if kind == "llama-server":
                    rows[kind].append(run_llama_server(a.model, question))
                    continue
                folder = warm if kind == "warm" else tmp / f"cold{i}"
                rows[kind].append(run_child(kind, folder, a.model, question))
                shutil.rmtree(tmp / f"cold{i}", ignore_errors=True)
            print(f"round {i + 1}: " + ", ".join(f"{k} {rows[k][-1]['ttft'] * 1000:.0f} ms" for k in kinds),
                  file=sys.stderr)
        report(rows, a)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report(rows: dict[str, list[dict[str, float]]], a: argparse.Namespace) -> None:
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in rows.items()}
    vs_server = [w["ttft"] / s["ttft"] for w, s in zip(rows["warm"], rows["llama-server"])]
    vs_server_mem = [w["ttft"] / s["ttft_mem"] for w, s in zip(rows["warm"], rows["llama-server"])]
    ratio = [w["ttft"] / o["ttft"] for w, o in zip(rows["warm"], rows["off"])]
    cost = [c["total"] / o["total"] for c, o in zip(rows["cold"], rows["off"])]
    out = {"cpu": cpu_name(), "threads": os.cpu_count(), "model": a.model or "default", "rounds": a.rounds,
           "median": med, "ttft_warm_over_off": {"median": statistics.median(ratio), "min": min(ratio),
                                                 "max": max(ratio)},
           "total_cold_over_off": {"median": statistics.median(cost), "min": min(cost), "max": max(cost)},
           "ttft_warm_over_llama_server_restart": {"median": statistics.median(vs_server), "min": min(vs_server),
                                                   "max": max(vs_server)},
           "ttft_warm_over_llama_server_in_memory": {"median": statistics.median(vs_server_mem),
                                                     "min": min(vs_server_mem), "max": max(vs_server_mem)}}
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    print(f"CPU: {out['cpu']}, {a.rounds} rounds, each a fresh process; prompt {med['off']['prompt']:.0f} tokens; "
          f"load average at the end {load:.1f}")
    print("| | time to first token | whole request (8 tokens) | cached tokens |")
    print("|---|---|---|---|")
    for k, label in (("off", "no cache"), ("cold", "cache on, empty (decode + save)"),
                     ("warm", "cache on, system prompt on disk")):
        m = med[k]
        print(f"| {label} | {m['ttft'] * 1000:.0f} ms | {m['total'] * 1000:.0f} ms | {m['cached']:.0f} |")
    ls = med["llama-server"]
    print(f"| llama-server after a restart (cache_prompt) | {ls['ttft'] * 1000:.0f} ms | | 0 |")
    print(f"| llama-server, system prompt in memory (no restart) | {ls['ttft_mem'] * 1000:.0f} ms | | |")
    for key, label in (("ttft_warm_over_off", "first token, warm / off"),
                       ("total_cold_over_off", "whole request, cold / off"),
                       ("ttft_warm_over_llama_server_restart", "first token, warm / llama-server after a restart"),
                       ("ttft_warm_over_llama_server_in_memory", "first token, warm / llama-server in memory")):
        r = out[key]
        print(f"{label}: {r['median']:.3f} (range {r['min']:.3f}-{r['max']:.3f})")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
