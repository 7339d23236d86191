"""Claude Code itself against ``localllm serve``: one ``claude -p`` run, and what it reports.

Installs Claude Code from the npm registry into the bench cache once (``npm install
@anthropic-ai/claude-code``, about 240 MB), starts ``localllm serve MODEL`` with
``--alias 'claude-*=MODEL'`` and a key, and runs ``claude -p PROMPT --max-turns 1 --output-format
json`` with ``ANTHROPIC_BASE_URL`` pointing at it (telemetry, auto-update and other non-essential
traffic off; a throwaway HOME). Prints Claude Code's own result: whether it got an answer, its
usage (``cache_read_input_tokens`` says how much of each ~20,000-token Claude Code prompt the
server read from its cache) and the wall time.

Claude Code's prompt (system prompt and about two dozen tools) is about 20,000 tokens: the model
needs that context (``gemma3-270m`` has 32,768; SmolLM2-135M has 8,192 and cannot take it).

Usage:
    python benchmarks/claude_code_live.py [--model gemma3-270m] [--ctx 32768] [--max-output 300] [--prompt "Say hi"]

Not run in CI (minutes on two cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.serverutil import serve_process  # noqa: E402

CACHE = Path(os.environ.get("LOCALLLM_BENCH_CACHE", Path.home() / ".cache" / "localllm-bench")) / "claude-code"
KEY = "sk-local-bench"


def claude_binary() -> Path:
    """Claude Code's native binary, installed with npm into the cache on first use."""
    found = sorted(CACHE.glob("node_modules/@anthropic-ai/claude-code-*/claude"))
    if found:
        return found[0]
    if shutil.which("npm") is None:
        sys.exit("npm is needed to install Claude Code (Debian: apt install npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(CACHE), "@anthropic-ai/claude-code"],
                   check=True)
    found = sorted(CACHE.glob("node_modules/@anthropic-ai/claude-code-*/claude"))
    if not found:
        sys.exit(f"npm installed Claude Code, but no native binary for {platform.machine()} came with it")
    return found[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--ctx", type=int, default=32768)
    ap.add_argument("--max-output", type=int, default=300, help="CLAUDE_CODE_MAX_OUTPUT_TOKENS")
    ap.add_argument("--prompt", default="Say hi")
    a = ap.parse_args()
    claude = claude_binary()
    version = subprocess.run([str(claude), "--version"], capture_output=True, text=True).stdout.strip()
    with serve_process(a.model, "--parallel", "1", "--ctx", str(a.ctx), "--api-key", KEY,
                       "--alias", f"claude-*={a.model}") as live, tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, "ANTHROPIC_BASE_URL": live.url, "ANTHROPIC_AUTH_TOKEN": KEY,
               "DISABLE_TELEMETRY": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
               "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(a.max_output)}
        t = time.perf_counter()
        r = subprocess.run([str(claude), "-p", a.prompt, "--max-turns", "1", "--output-format", "json"],
                           capture_output=True, text=True, env=env, timeout=3600)
        secs = time.perf_counter() - t
    print(f"# Claude Code {version} against localllm serve {a.model} --ctx {a.ctx} "
          f"({platform.processor() or platform.machine()}), {secs:.0f} s")
    try:
        out = json.loads(r.stdout)
    except ValueError:
        sys.exit(f"claude exited {r.returncode}: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    print(json.dumps({k: out.get(k) for k in ("subtype", "is_error", "result", "num_turns", "duration_ms")}, indent=1))
    print(json.dumps(out.get("usage"), indent=1))


if __name__ == "__main__":
    main()
