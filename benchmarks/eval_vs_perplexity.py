"""``localllm eval`` against llama.cpp's ``llama-perplexity --kl-divergence``,
on the same files and text: the figures side by side, and the time each takes.

    python benchmarks/eval_vs_perplexity.py [--model smollm2-135m:q4_0] [--ref smollm2-135m:q8_0] [--ctx 512]
                                            [--rounds 2] [--json out.json]

Rounds alternate who goes first. localllm's reference cache is disabled
(``--no-cache``) so both sides compute the reference's distributions each round.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import build, repack_flags  # noqa: E402


def ours(model: Path, ref: Path, ctx: int, threads: int) -> tuple[dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "localllm", "eval", str(model), "--ref", str(ref), "--ctx", str(ctx),
                        "--threads", str(threads), "--no-cache", "--json", "-q"], capture_output=True, text=True,
                       check=True)
    return json.loads(p.stdout), time.perf_counter() - t0


def theirs(tool: Path, model: Path, ref: Path, text: Path, ctx: int, threads: int) -> tuple[dict, float]:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base.kld"
        t0 = time.perf_counter()
        subprocess.run([str(tool), *repack_flags("llama-perplexity"), "-m", str(ref), "-f", str(text), "-c", str(ctx), "-t", str(threads),
                        "--kl-divergence-base", str(base)], capture_output=True, text=True, check=True)
        p = subprocess.run([str(tool), *repack_flags("llama-perplexity"), "-m", str(model), "-c", str(ctx), "-t", str(threads),
                            "--kl-divergence-base", str(base), "--kl-divergence"], capture_output=True, text=True,
                           check=True)
        seconds = time.perf_counter() - t0
    log = p.stdout + p.stderr

    def num(pattern: str) -> float:
        m = re.search(pattern, log)
        if m is None:
            raise RuntimeError(f"llama-perplexity printed no {pattern!r}")
        return float(m.group(1))

    return {"perplexity": num(r"Mean PPL\(Q\)\s*:\s*([\d.]+)"), "perplexity_error": num(r"Mean PPL\(Q\)\s*:\s*[\d.]+ ±\s*([\d.]+)"),
            "kl_mean": num(r"Mean\s+KLD:\s*([\d.]+)"), "kl_p99": num(r"99\.0%\s+KLD:\s*([\d.]+)"),
            "kl_max": num(r"Maximum KLD:\s*([\d.]+)"), "top1_agreement": num(r"Same top p:\s*([\d.]+)") / 100}, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m:q4_0")
    ap.add_argument("--ref", default="smollm2-135m:q8_0")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from localllm import store, resolve
    from localllm.evaluate import default_text

    tool = build("llama-perplexity")["llama-perplexity"]
    model, ref = resolve.resolve(args.model), resolve.resolve(args.ref)
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "eval.txt"
        text.write_text(default_text(), encoding="utf-8")
        times: dict[str, list[float]] = {"localllm": [], "llama-perplexity": []}
        a = b = {}
        for r in range(args.rounds):
            order = ["localllm", "llama-perplexity"] if r % 2 == 0 else ["llama-perplexity", "localllm"]
            for side in order:
                if side == "localllm":
                    a, s = ours(model, ref, args.ctx, args.threads)
                else:
                    b, s = theirs(tool, model, ref, text, args.ctx, args.threads)
                times[side].append(s)
    rows = [(k, a[k], b[k]) for k in ("perplexity", "perplexity_error", "kl_mean", "kl_p99", "kl_max", "top1_agreement")]
    print(f"{Path(model).name} against {Path(ref).name}, ctx {args.ctx}, built-in text")
    print(f"| figure | localllm eval | llama-perplexity |\n|---|---|---|")
    for k, x, y in rows:
        print(f"| {k} | {x:.6f} | {y:.6f} |")
    ta, tb = statistics.median(times["localllm"]), statistics.median(times["llama-perplexity"])
    print(f"| seconds (median of {args.rounds}) | {ta:.1f} | {tb:.1f} |")
    print(f"time ratio localllm / llama-perplexity: {ta / tb:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"figures": {k: [x, y] for k, x, y in rows}, "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
