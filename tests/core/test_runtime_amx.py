"""llama.cpp builds with AMX (built on a Xeon with AMX-INT8): ggml's AMX weight buffers crash the process
(SIGSEGV in ggml_backend_amx_mul_mat) on every batch of 2 tokens or more, so the runtime keeps weights
out of the extra buffer types there (runtime._lib.extra_buffers_usable). Seen on this project's AMX dev
VM: a Q8_0 or Q4_1 model decoding a 2-token batch died with signal 11 before the fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# a prompt batch, as every first request decodes one; in a child process, since the bug is a signal
_DECODE = """
import sys
from localllm import loader, runtime
s = loader.ModelSettings(model=sys.argv[1], n_ctx=256, repack=True)
m = loader.load(s)
ctx = runtime.Context(m.llama, n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2, **s.context_options())
b = runtime.Batch(64)
ids = m.prompter.tokenize("The quick brown fox jumps over the lazy dog. " * 8, add_special=True, special=False)[:48]
for i, t in enumerate(ids):
    b.add(t, i, 0, i == len(ids) - 1)
ctx.decode(b)
print("decoded", len(ids), runtime.extra_buffers_usable())
"""


def _decode(path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _DECODE, str(path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2])


def test_a_prompt_batch_decodes_with_repack_asked_for(default_model_path: Path) -> None:
    from localllm import runtime

    r = _decode(default_model_path)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-800:]}"
    assert r.stdout.split() == ["decoded", "48", str(not runtime.amx_compiled())], r.stdout


def test_extra_buffers_follow_the_build_and_the_opt_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import runtime

    from localllm import hardware

    monkeypatch.delenv("LOCALLLM_AMX", raising=False)
    assert runtime.extra_buffers_usable() is (not runtime.amx_compiled())
    # a build with AMX kernels runs only on a CPU with AMX (the kernel's own flags, read independently)
    assert not runtime.amx_compiled() or hardware.cpu()["flags"].get("amx_int8")
    assert runtime.amx_compiled() is ("AMX_INT8 = 1" in runtime.system_info())
    monkeypatch.setenv("LOCALLLM_AMX", "1")
    assert runtime.extra_buffers_usable() is True


def test_the_plan_counts_no_repacked_copy_without_extra_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Q4_0 and Q4_K weights are repacked on AVX2 only when extra buffers are used: the plan follows the runtime."""
    from localllm import plan, runtime

    avx2 = ({"avx2": True}, "x86_64")
    assert set(plan._repack_types(*avx2, repack=True).values()) >= {"Q4_0", "Q4_K"}
    assert plan._repack_types(*avx2, repack=False) == {}
    for usable in (False, True):
        monkeypatch.setattr(runtime, "extra_buffers_usable", lambda: usable)
        assert plan._this_cpu()["repack"] is usable
