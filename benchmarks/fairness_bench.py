"""Does a long prompt stall a running stream? ``localllm serve --prefill exact|fair`` (and llama-server).

One client streams a long answer (greedy, ``ignore_eos``) while another sends a ~4,000-token
prompt, through a real ``localllm serve --parallel 2`` process over loopback. Reports the
streaming client's inter-token gap (median, p99, max) idle and while the long prompt is read (from
sending it to its first token), and the long prompt's time to first token alone and under that
contention. Servers stay up and are measured in alternating order, ``--rounds`` times each; every
long prompt is new (a random prefix), so no cache answers it. The issue's goal: p99 gap ≤ 3 × the
idle gap while the long prompt's TTFT grows ≤ 25 %.

    python benchmarks/fairness_bench.py [--model smollm2-135m] [--rounds 2] [--prompt-words 4000]

llama-server is a column when ``~/.cache/localllm-bench/build/bin/llama-server`` exists
(``python benchmarks/native.py llama-server`` builds it); this script never builds it.
Prints a markdown table. Not run in CI.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import repack_flags  # noqa: E402
from serve_bench import WORDS, free_port, wait_healthy  # noqa: E402

LLAMA_SERVER = Path.home() / ".cache" / "localllm-bench" / "build" / "bin" / "llama-server"


def stream(port: int, prompt: str, max_tokens: int, on_chunk, stop: threading.Event | None = None) -> None:
    """POST a streamed completion; ``on_chunk(time)`` for every content chunk; ends early on ``stop``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    while not (stop is not None and stop.is_set()):
        line = resp.readline()
        if not line or line.startswith(b"data: [DONE]"):
            break
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0].get("text"):
            on_chunk(time.perf_counter())
    conn.close()


def long_prompt(rng: random.Random, words: int) -> str:
    return f"{rng.random():.9f} " + " ".join(rng.choice(WORDS) for _ in range(words)) + "\nSummary:"


def ttft(port: int, prompt: str) -> float:
    first: list[float] = []
    t0 = time.perf_counter()
    stream(port, prompt, 4, first.append)
    return first[0] - t0


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:])]


def contended(port: int, prompt: str, idle_tokens: int) -> dict[str, list[float] | float]:
    """Stream an answer; after ``idle_tokens`` of it, send ``prompt``; stop when that answers."""
    times: list[float] = []
    started, stop = threading.Event(), threading.Event()

    def on_chunk(t: float) -> None:
        times.append(t)
        if len(times) == idle_tokens:
            started.set()

    a = threading.Thread(target=stream, args=(port, "Count from one to ten thousand: one, two, three,", 8000,
                                              on_chunk, stop))
    a.start()
    if not started.wait(120):
        raise SystemExit("the streaming client got no tokens")
    t_send = time.perf_counter()
    t_first = t_send + ttft(port, prompt)
    stop.set()
    a.join()
    idle = [t for t in times if t <= t_send]
    during = [t for t in times if t_send <= t <= t_first]
    # the gap that spans the send belongs to "during" (the stream waited behind the prompt)
    return {"idle": gaps(idle), "during": gaps(idle[-1:] + during + [t for t in times if t > t_first][:1]),
            "ttft": t_first - t_send}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def measure(name: str, port: int, args: argparse.Namespace, rng: random.Random) -> dict[str, object]:
    alone = ttft(port, long_prompt(rng, args.prompt_words))
    c = contended(port, long_prompt(rng, args.prompt_words), args.idle_tokens)
    print(f"  {name}: TTFT alone {alone:.2f} s, contended {c['ttft']:.2f} s; gaps idle median "
          f"{statistics.median(c['idle']) * 1e3:.1f} ms, during median {statistics.median(c['during']) * 1e3:.1f} ms"
          f" max {max(c['during']) * 1e3:.0f} ms ({len(c['during'])} gaps)", flush=True)
    return {"alone": alone, **c}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=5120, help="context per sequence")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=3600, help="words of the long prompt (~1.1 tokens each)")
    ap.add_argument("--idle-tokens", type=int, default=40, help="tokens streamed before the long prompt is sent")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto",
                    help="our servers' --flash-attn (llama-server's -fa)")
    ap.add_argument("--modes", default="exact,fair", help="our --prefill modes to measure (fair:K too)")
    ap.add_argument("--no-llama-server", action="store_true", help="leave llama-server out")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from localllm import resolve

    gguf = resolve.resolve(args.model)
    ours = [sys.executable, "-m", "localllm", "serve", "--model-path", str(gguf), "--threads", str(args.threads),
            "--parallel", "2", "--ctx", str(args.ctx), "--host", "127.0.0.1", "--flash-attn", args.flash_attn]
    servers = {f"localllm --prefill {m}": ours + ["--prefill", m] for m in args.modes.split(",")}
    if args.no_llama_server:
        pass
    elif LLAMA_SERVER.exists():
        servers["llama-server"] = [str(LLAMA_SERVER), "-m", str(gguf), "-t", str(args.threads), "-tb",
                                   str(args.threads), "-np", "2", "-c", str(2 * args.ctx), "--host", "127.0.0.1",
                                   "--no-webui", "-fa", args.flash_attn, *repack_flags("llama-server")]
    else:
        print("llama-server not built (python benchmarks/native.py llama-server builds it)")
    procs: dict[str, subprocess.Popen] = {}
    ports: dict[str, int] = {}
    runs: dict[str, list[dict[str, object]]] = {name: [] for name in servers}
    rng = random.Random(args.seed)
    try:
        for name, cmd in servers.items():  # all up at once: an idle server uses no CPU
            ports[name] = free_port()
            procs[name] = subprocess.Popen(cmd + ["--port", str(ports[name])], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            wait_healthy(f"http://127.0.0.1:{ports[name]}", procs[name], timeout=300)
            ttft(ports[name], long_prompt(rng, 200))  # warm-up
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            print(f"round {r + 1}: " + ", ".join(order), flush=True)
            for name in order:
                runs[name].append(measure(name, ports[name], args, rng))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait()
    table(runs)


def table(runs: dict[str, list[dict[str, object]]]) -> None:
    print("\n| server | idle gap median | gap while the long prompt is read: median / p99 / max | p99 / idle "
          "| long prompt TTFT alone | contended | growth |")
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        idle = [g for r in rs for g in r["idle"]]  # type: ignore[attr-defined]
        during = [g for r in rs for g in r["during"]]  # type: ignore[attr-defined]
        alone = statistics.median(r["alone"] for r in rs)  # type: ignore[type-var]
        cont = statistics.median(r["ttft"] for r in rs)  # type: ignore[type-var]
        i = statistics.median(idle)
        print(f"| {name} | {i * 1e3:.1f} ms | {statistics.median(during) * 1e3:.0f} / {pct(during, 0.99) * 1e3:.0f} / "
              f"{max(during) * 1e3:.0f} ms | {pct(during, 0.99) / i:.1f} × | {alone:.2f} s | {cont:.2f} s "
              f"| {100 * (cont / alone - 1):+.0f} % |")


if __name__ == "__main__":
    main()
