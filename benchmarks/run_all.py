"""Every side-by-side comparison in one run; writes docs/BENCHMARKS.md and its PNGs.

    python benchmarks/run_all.py [--quick] [--only generation,eval,...]

Sections (each is one script of this folder, run as its own process, its
output kept as it printed it):

- machine: CPU, flags, cores, memory, llama.cpp build
- bench: ``localllm bench`` over the built-in versions, with a plot
- generation: ``Model.stream`` against ``llama-bench`` (generation_bench.py)
- eval: ``localllm eval`` against ``llama-perplexity --kl-divergence`` (eval_vs_perplexity.py)
- serve: ``localllm serve`` against ``llama-server`` (serve_bench.py)
- convert: ``localllm convert`` against ``convert_hf_to_gguf.py`` (convert_bench.py)

Every script alternates the two sides round by round on the same inputs and
reports medians and ratios. Run on an idle machine: other load skews every
figure (the load average is printed at the start and the end).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DOC = ROOT / "docs" / "BENCHMARKS.md"
IMG = ROOT / "docs" / "img"
PY = sys.executable

BUILTINS = ["smollm2-135m:bf16", "smollm2-135m:q8_0", "smollm2-135m:q6_k", "smollm2-135m:q4_k_m",
            "smollm2-135m:q4_0", "smollm2-135m:q4_1", "gemma3-270m"]


def sections(quick: bool) -> dict[str, tuple[str, list[str]]]:
    r = ["--rounds", "1"] if quick else []
    return {
        "bench": ("`localllm bench` over the built-in versions (pp128, tg64, 3 alternating reps)",
                  [PY, "-m", "localllm", "bench", *BUILTINS, "--reps", "1" if quick else "3", "-q",
                   "--plot", str(IMG / "bench.png")]),
        "generation": ("`Model.stream` against `llama-bench` (benchmarks/generation_bench.py)",
                       [PY, str(HERE / "generation_bench.py"), *r]),
        "eval": ("`localllm eval` against `llama-perplexity --kl-divergence` (benchmarks/eval_vs_perplexity.py)",
                 [PY, str(HERE / "eval_vs_perplexity.py"), *(["--rounds", "1"] if quick else [])]),
        "serve": ("`localllm serve` against `llama-server` (benchmarks/serve_bench.py)",
                  [PY, str(HERE / "serve_bench.py"), *(["--repeat", "1"] if quick else [])]),
        "convert": ("`localllm convert` against `convert_hf_to_gguf.py` (benchmarks/convert_bench.py)",
                    [PY, str(HERE / "convert_bench.py"), "--model", "smollm2-f32", *r]),
    }


def machine() -> str:
    from localllm import hardware, runtime

    c, m = hardware.cpu(), hardware.memory()
    flags = " ".join(f for f, on in c["flags"].items() if on)
    return (f"- CPU: {c['model']} ({c['arch']}), {c['usable_cores']} usable cores of {c['logical_cores']}\n"
            f"- flags: {flags}\n- memory: {m.get('total', 0) / 2**30:.1f} GiB\n"
            f"- llama.cpp: {runtime.llama_cpp_version()}\n- load average at start: {os.getloadavg()[0]:.2f}\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one round each (a smoke run, not for the doc)")
    ap.add_argument("--only", default="", help="comma-separated sections")
    args = ap.parse_args()
    IMG.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in args.only.split(",") if s] or list(sections(args.quick))
    out = [f"# Benchmarks\n\nWritten by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
           f"{datetime.date.today().isoformat()}. Each section is one script's output, as printed.\n",
           "## Machine\n", machine()]
    failed = []
    for key in wanted:
        title, cmd = sections(args.quick)[key]
        print(f"== {key}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        body = p.stdout.strip() or "(no output)"
        if p.returncode != 0:
            failed.append(key)
            body += f"\n\nFAILED (exit {p.returncode}): {p.stderr.strip().splitlines()[-1:] or ''}"
        out.append(f"## {key}: {title}\n\n```\n{body}\n```\n\n({time.perf_counter() - t0:.0f} s)\n")
        if key == "bench" and (IMG / "bench.png").exists():
            out.append("![prompt and generation speed](img/bench.png)\n")
    out.append(f"Load average at the end: {os.getloadavg()[0]:.2f}\n")
    DOC.write_text("\n".join(out))
    print(f"wrote {DOC}" + (f"; failed: {', '.join(failed)}" if failed else ""), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
