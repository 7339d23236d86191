"""Load time: a fresh process to its first token, localllm (weights mapped, or read into memory as
``mmap`` auto does where huge pages exist) against llama.cpp's ``llama-completion`` (mapped, and
``--load-mode none``: read).

Every run is a new process that loads the GGUF and generates one token after a one-word prompt
(both tools warm up at load, as they do by default: one small decode that touches every weight).
Reported per row: the wall time from starting the process to its exit, and the load time the tool
itself reports (ours: ``Model(...)`` returning, after imports; llama.cpp's: its ``load time`` line).
Rows run in alternating order for ``--rounds``. The file is in the page cache (read once first)
unless ``--cold``, which drops the page cache before every run (root only).

    python benchmarks/load_time.py 1b-q4km.gguf 7b-q4km.gguf [--rounds 3] [--cold]

``llama-completion`` is a row when ``~/.cache/localllm-bench/build/bin/llama-completion`` exists
(``python benchmarks/native.py llama-completion`` builds it). Prints a markdown table. Not run in CI.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from native import repack_flags  # noqa: E402

BIN = Path.home() / ".cache" / "localllm-bench" / "build" / "bin"
CHILD = """
import sys, time
from localllm import Model
t0 = time.perf_counter()
m = Model(sys.argv[1], mmap=sys.argv[2] == "mapped", n_ctx=512, prompt_cache=False, n_threads=2)
t1 = time.perf_counter()
m.generate("Hello", max_tokens=1, temperature=0)
print(f"LOAD {t1 - t0:.4f} FIRST {time.perf_counter() - t1:.4f} MMAP {m.info.mmap}")
"""


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def ours(path: Path, how: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), how], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    m = re.search(r"LOAD ([\d.]+) FIRST [\d.]+ MMAP (\w+)", p.stdout)
    assert m and m.group(2) == str(how == "mapped"), p.stdout + p.stderr
    return wall, float(m.group(1))


def native(path: Path, how: str) -> tuple[float, float]:
    cmd = [str(BIN / "llama-completion"), "-m", str(path), "-p", "Hello", "-n", "1", "-no-cnv",
           "-t", "2", "-c", "512", *repack_flags("llama-completion"), "--load-mode", "none" if how == "read" else "mmap"]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "LD_LIBRARY_PATH": str(BIN)},
                       stdin=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    m = re.search(r"load time\s*=\s*([\d.]+) ms", p.stdout + p.stderr)
    assert m, p.stderr[-2000:]
    return wall, float(m.group(1)) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run (root)")
    args = ap.parse_args()
    rows = [("localllm", "mapped", ours), ("localllm", "read", ours)]
    if (BIN / "llama-completion").exists():
        rows += [("llama-completion", "mapped", native), ("llama-completion", "read", native)]
    else:
        print("llama-completion not built (python benchmarks/native.py llama-completion builds it)")
    print("| model | tool | weights | process to first token (median, min–max) | load as reported |")
    print("|---|---|---|---|---|")
    for path in args.models:
        if not args.cold:  # warm: in the page cache before the first run
            with path.open("rb") as f:
                while f.read(1 << 26):
                    pass
        got: dict[int, list[tuple[float, float]]] = {i: [] for i in range(len(rows))}
        for r in range(args.rounds):
            order = list(range(len(rows))) if r % 2 == 0 else list(range(len(rows)))[::-1]
            for i in order:
                if args.cold:
                    drop_caches()
                got[i].append(rows[i][2](path, rows[i][1]))
        for i, (tool, how, _) in enumerate(rows):
            walls, loads = [w for w, _ in got[i]], [x for _, x in got[i]]
            print(f"| {path.name} | {tool} | {how} | {statistics.median(walls):.2f} s ({min(walls):.2f}–"
                  f"{max(walls):.2f}) | {statistics.median(loads):.2f} s |", flush=True)


if __name__ == "__main__":
    main()
