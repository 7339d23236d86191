"""Generation speed of ``Model.stream`` against llama.cpp's own llama-bench,
side by side in one run, on the same GGUF and thread count; plus time to
first token for a 200-token prompt.

    python benchmarks/generation_bench.py [--threads 2] [--tokens 128] [--rounds 3] [--json out.json]

Runs alternate, and who goes first alternates with the round, so that drift in
machine speed hits both; the ratio reported is the median of the per-round
ratios (with their range), next to the median speed of each; the same for the 200-token prompt
(llama-bench's time over our time to first token, which includes sampling it: > 1 is ours faster). llama-bench is built by benchmarks/native.py into a cache dir.
Each model is measured in a fresh process, as a user's `localllm run` would load it (in a process that
has loaded and freed other models, a small weight buffer can keep small pages: runtime/_hugepages.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import build, repack_flags  # noqa: E402

MODELS = ["smollm2-135m:q8_0", "smollm2-135m:bf16", "smollm2-135m:q4_0", "smollm2-135m:q4_1", "gemma3-270m"]
PROMPT = ", ".join(str(i) for i in range(1, 41)) + ","  # every model here keeps counting: no early EOS


def native_tg(bench: Path, path: Path, threads: int, n: int, depth: int) -> float:
    """llama-bench's decode speed after ``depth`` tokens of context (our prompt's length)."""
    out = subprocess.run([str(bench), *repack_flags("llama-bench"), "-m", str(path), "-t", str(threads), "-p", "0",
                          "-n", str(n), "-d", str(depth),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def native_pp(bench: Path, path: Path, threads: int, n: int) -> float:
    out = subprocess.run([str(bench), *repack_flags("llama-bench"), "-m", str(path), "-t", str(threads), "-p", str(n),
                          "-n", "0", "-r", "3",  # three prompts, as ttft_200 takes the median of three
                          "-o", "json"], capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def ours_tg(m, n: int) -> float:
    # ignore_eos-like: a prompt that keeps going; we check the count below
    stream = m.stream(PROMPT, max_tokens=n, temperature=0)
    for _ in stream:
        pass
    r = m.last
    if r.completion_tokens < n * 0.9:
        raise SystemExit(f"the model stopped after {r.completion_tokens} tokens; pick another prompt")
    return r.generation_tokens_per_s


def ttft_200(m) -> float:
    """Time to first token for a fresh 200-token prompt (no cached prefix)."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    times = []
    for i in range(3):
        text = f"{i} " + " ".join(words[(i + j) % len(words)] for j in range(400))
        ids = m.tokenize(text, add_bos=False)[:200]
        prompt = m.detokenize(ids)
        m.reset()  # a cold prompt (no prefix reuse) for a fair measurement
        r = m.complete(prompt, max_tokens=1, temperature=0)
        times.append(r.time_to_first_token_s)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--row", action="store_true", help=argparse.SUPPRESS)  # one model, in this process
    a = ap.parse_args()

    from localllm import Model, store, resolve

    bench = build("llama-bench")["llama-bench"]
    if not a.row:
        rows = []
        for ref in a.models:
            out = subprocess.run([sys.executable, __file__, "--row", "--models", ref, "--rounds", str(a.rounds),
                                  "--tokens", str(a.tokens), "--threads", str(a.threads)], check=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            rows.append(row)
            print(f"{ref:20s} native tg {row['native_tg']:7.1f}  ours {row['ours_tg']:7.1f}  ratio {row['ratio']:.3f} "
                  f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f})  | 200-token prompt: native pp "
                  f"{row['native_pp200_ms']:.0f} ms, our TTFT {row['ours_ttft200_ms']:.0f} ms, ratio {row['prompt_ratio']:.3f} "
                  f"({row['prompt_ratio_min']:.2f}-{row['prompt_ratio_max']:.2f})", flush=True)
        if a.json:
            a.json.write_text(json.dumps({"threads": a.threads, "tokens": a.tokens, "time": time.time(),
                                          "rows": rows}, indent=2))
        return
    for ref in a.models:
        path = resolve.resolve(ref)
        with Model(path, n_ctx=1024, n_threads=a.threads, prompt_cache=False) as m:
            ours_tg(m, 16)  # warm up (page in the weights)
            depth = len(m.tokenize(PROMPT))
            nat, our, ratios, pps, ttfts, pp_ratios = [], [], [], [], [], []
            for r in range(a.rounds):
                # alternate who goes first, and compare within a round: this VM's speed drifts
                # by 20 % over a minute, so a ratio of medians taken apart would measure the drift
                steps = [lambda: nat.append(native_tg(bench, path, a.threads, a.tokens, depth)),
                         lambda: our.append(ours_tg(m, a.tokens)),
                         lambda: pps.append(native_pp(bench, path, a.threads, 200)),
                         lambda: ttfts.append(ttft_200(m))]
                for step in (steps if r % 2 == 0 else steps[::-1]):
                    step()
                ratios.append(our[-1] / nat[-1])
                # the prompt: llama-bench's time for 200 tokens over our time to first token, in this round
                # (> 1: our first token came sooner than llama-bench read the prompt)
                pp_ratios.append((200 / pps[-1]) / ttfts[-1])
            pp, ttft = statistics.median(pps), statistics.median(ttfts)
        row = {"model": ref, "native_tg": statistics.median(nat), "ours_tg": statistics.median(our),
               "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "native_pp200": pp,
               "native_pp200_ms": 200 / pp * 1000, "ours_ttft200_ms": ttft * 1000,
               "prompt_ratio": statistics.median(pp_ratios), "prompt_ratio_min": min(pp_ratios),
               "prompt_ratio_max": max(pp_ratios)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
