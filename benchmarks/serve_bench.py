"""``localllm serve`` against llama.cpp's own ``llama-server``, side by side.

Builds ``llama-server`` from the llama.cpp source inside llama-cpp-python's
sdist (the same llama.cpp our wheel runs) into a cache directory, starts both
servers on the same GGUF with the same threads and slots, and measures:

* aggregate generated tok/s for 64-token completions with 1 and 4 concurrent clients;
* time to first token for a 200-token prompt (streamed, fresh prompt each time).

Usage:
    python benchmarks/serve_bench.py --model smollm2-135m:q4_0 --threads 2 [--no-repack]

Nothing is written to the checkout; the build lives in ``~/.cache/localllm-bench``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import build, repack_flags  # noqa: E402  (llama.cpp's tools from the pinned sdist, in a cache dir)

WORDS = ("apple river stone cloud music paper light window garden silver yellow mountain ocean story "
         "engine forest bridge candle mirror rocket").split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"{url} did not become healthy")


def prompt(n_words: int, rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def complete(port: int, text: str, max_tokens: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": text, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}),
        headers={"Content-Type": "application/json"})
    body = json.loads(conn.getresponse().read())
    conn.close()
    return int(body["usage"]["completion_tokens"])


def aggregate(port: int, clients: int, rounds: int, rng: random.Random) -> float:
    """Generated tokens per second over all clients, each running ``rounds`` requests back to back."""
    total = [0] * clients
    texts = [[f"Story {rng.random():.6f}: " + prompt(12, rng) for _ in range(rounds)] for _ in range(clients)]

    def client(i: int) -> None:
        for t in texts[i]:
            total[i] += complete(port, t, 64)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(total) / (time.perf_counter() - t0)


def ttft(port: int, n_tokens_words: int, rng: random.Random) -> float:
    """Seconds from sending a streamed request to its first content chunk."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    body = json.dumps({"prompt": f"{rng.random():.6f} " + prompt(n_tokens_words, rng), "max_tokens": 4,
                       "stream": True, "temperature": 0})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = None
    while True:
        line = resp.readline()
        if not line:
            break
        if line.startswith(b"data: {") and first is None:
            first = time.perf_counter() - t0
    conn.close()
    return first or float("nan")


def measure(name: str, port: int, args: argparse.Namespace, rep: int) -> dict[str, float]:
    # fresh prompts every run (both servers cache prompts, and TTFT must measure prompt processing),
    # and the same prompts for both servers in the same run
    rng = random.Random(args.seed + 1000 * rep)
    aggregate(port, 1, 1, rng)  # warm-up
    out = {f"{c} clients tok/s": aggregate(port, c, args.rounds, rng) for c in (1, 4)}
    out["TTFT 200-token prompt ms"] = 1000 * statistics.median(ttft(port, args.prompt_words, rng)
                                                               for _ in range(5))
    print(f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m:q4_0")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=1024, help="context per sequence")
    ap.add_argument("--rounds", type=int, default=3, help="requests per client")
    ap.add_argument("--prompt-words", type=int, default=200, help="~1 token per word for these words")
    ap.add_argument("--no-repack", dest="repack", action="store_false", help="pass --no-repack to localllm serve")
    ap.add_argument("--repeat", type=int, default=3, help="alternating measurements per server (median)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from localllm import store, resolve

    gguf = resolve.resolve(args.model)
    exe = build("llama-server")["llama-server"]
    servers = {
        "llama-server": [str(exe), "-m", str(gguf), "-t", str(args.threads), "-tb", str(args.threads),
                         "-np", str(args.parallel), "-c", str(args.ctx * args.parallel), "--host", "127.0.0.1",
                         "--no-webui", *repack_flags("llama-server")],
        "localllm serve": [sys.executable, "-m", "localllm", "serve", "--model-path", str(gguf),
                           "--threads", str(args.threads), "--parallel", str(args.parallel),
                           "--ctx", str(args.ctx), "--host", "127.0.0.1"] + ([] if args.repack else ["--no-repack"]),
    }
    # both servers stay up (an idle one uses no CPU) and are measured alternately, several
    # times, so a burst of load from elsewhere on the machine hits both; medians are reported
    procs, ports = {}, {}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    try:
        for name, cmd in servers.items():
            ports[name] = free_port()
            procs[name] = subprocess.Popen(cmd + ["--port", str(ports[name])], stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
            wait_healthy(f"http://127.0.0.1:{ports[name]}", procs[name])
        for rep in range(args.repeat):
            order = list(servers) if rep % 2 == 0 else list(servers)[::-1]  # who goes first alternates
            for name in order:
                runs[name].append(measure(f"{name} (run {rep + 1})", ports[name], args, rep))
    finally:
        for proc in procs.values():
            proc.terminate()
            proc.wait(timeout=30)
    results = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    base, ours = results["llama-server"], results["localllm serve"]
    print(f"\nmedians of {args.repeat} runs; model {gguf.name}, {args.threads} threads, {args.parallel} slots, "
          f"64-token completions{'' if args.repack else ', localllm --no-repack'}")
    for key in ("1 clients tok/s", "4 clients tok/s"):
        print(f"  {key:26s} llama-server {base[key]:7.1f}  localllm {ours[key]:7.1f}  ratio {ours[key] / base[key]:.2f}")
    key = "TTFT 200-token prompt ms"
    print(f"  {key:26s} llama-server {base[key]:7.1f}  localllm {ours[key]:7.1f}")


if __name__ == "__main__":
    main()
