"""The memory planner: its estimate is checked against real RSS growth, and
its placement decisions and refusals are checked with what-if inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from localllm import placement, plan
from tests.helpers import ROOT


# one fresh process per measurement, so nothing from earlier loads is resident.
# RSS growth = from after llama.cpp's backend init to after loading the model,
# creating the context and decoding a full 512-token micro-batch (the peak).
_MEASURE = """
import json, sys
from localllm import runtime
def rss():
    return int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) * 1024
path, n_ctx, mmap = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
runtime._backend()
r0 = rss()
m = runtime.LlamaModel(path, use_mmap=mmap)
c = runtime.Context(m, n_ctx=n_ctx, n_threads=2)
ids = m.tokenize("The quick brown fox jumps over the lazy dog. " * 200, add_special=True, parse_special=False)
ids = ids[:min(n_ctx, 512)]
b = runtime.Batch(c.n_batch)
for i, t in enumerate(ids):
    b.add(t, i, 0, i == len(ids) - 1)
c.decode(b)
print(json.dumps({"growth": rss() - r0}))
"""


def measure(path: Path, n_ctx: int, mmap: bool = True) -> int:
    # the CPU placement's memory: on a GPU build llama.cpp would also run a 512-token batch's matmuls on a
    # visible device (op offload), so the devices are hidden (an empty list hides all)
    env = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(n_ctx), "1" if mmap else "0"], cwd=ROOT,
                         capture_output=True,
                         text=True, timeout=120, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"]


@pytest.fixture(scope="module")
def q4_0_path() -> Path:
    from localllm import store, resolve

    return resolve.resolve("smollm2-135m:q4_0")


@pytest.mark.parametrize("mmap", [True, False], ids=["mapped", "read"])
@pytest.mark.parametrize("fixture", ["default_model_path", "gemma_path", "q4_0_path"])
def test_estimate_matches_measured_rss(fixture: str, mmap: bool, request: pytest.FixtureRequest) -> None:
    """Mapped and read into memory; Q4_0 and Gemma's Q4_K are repacked (a copy of the mapped file's
    tensors when mapped, their only copy when read)."""
    path = request.getfixturevalue(fixture)
    measured, estimated = {}, {}
    for n_ctx in (512, 4096):
        measured[n_ctx] = measure(path, n_ctx, mmap)
        estimated[n_ctx] = plan.make_plan(path, n_ctx=n_ctx, offload=False, gpu_free=0, mmap=mmap).ram_bytes
        assert abs(measured[n_ctx] - estimated[n_ctx]) <= 0.15 * estimated[n_ctx], (n_ctx, measured, estimated)
    # the context-dependent part (KV cache, attention mask) must be right on its own too
    d_meas, d_est = measured[4096] - measured[512], estimated[4096] - estimated[512]
    assert abs(d_meas - d_est) <= 0.15 * d_est, (d_meas, d_est)


def test_gemma_kv_cache_by_layer_type(gemma_path: Path) -> None:
    h = plan.read_header(gemma_path)
    k_w, v_w, swa, window = plan.kv_layout(h)
    assert window == 512 and swa.count(False) == 3 and len(swa) == 18  # layers 5, 11, 17 are global
    full = plan.estimate(h, 4096, cpu={})
    assert full.kv_bytes == 18 * 4096 * (256 + 256) * 2  # swa_full (llama.cpp's default) keeps every cell
    windowed = plan.estimate(h, 4096, swa_full=False, cpu={})
    assert windowed.kv_bytes == (3 * 4096 + 15 * 1024) * 512 * 2  # pad(512 + 512, 256) cells on SWA layers


def test_cpu_only_build_means_zero_layers_with_reason(default_model_path: Path) -> None:
    p = plan.make_plan(default_model_path, n_ctx=1024, offload=False, gpu_free=0, gpu_memory=8 * 2**30)
    assert p.gpu_layers == 0 and p.fits
    assert any("no GPU offload" in r for r in p.reasons)
    n, why = placement.explain(default_model_path, "auto", 1024)
    from localllm import runtime

    if not runtime.supports_gpu_offload():
        assert n == 0 and "no GPU offload" in why


def test_partial_offload_respects_gpu_memory(default_model_path: Path) -> None:
    everything = plan.make_plan(default_model_path, n_ctx=2048, offload=True, gpu_free=80 * 2**30)
    assert everything.gpu_layers == everything.n_layer + 1
    some = plan.make_plan(default_model_path, n_ctx=2048, offload=True, gpu_free=80 * 2**30,
                          gpu_memory=plan._GPU_HEADROOM + everything.compute_reserved_bytes + 40 * 2**20)
    assert 0 < some.gpu_layers < everything.n_layer
    assert some.vram_bytes <= 40 * 2**20 + some.compute_reserved_bytes
    cpu_only = plan.make_plan(default_model_path, n_ctx=2048, offload=False, gpu_free=0)
    assert everything.ram_bytes < some.ram_bytes < cpu_only.ram_bytes
    none = plan.make_plan(default_model_path, n_ctx=2048, offload=True, gpu_free=80 * 2**30, gpu_memory=2**20)
    assert none.gpu_layers == 0


def test_refusal_says_what_would_fit(default_model_path: Path) -> None:
    need = plan.make_plan(default_model_path, n_ctx=512, offload=False, gpu_free=0).ram_bytes
    p = plan.make_plan(default_model_path, n_ctx=8192, offload=False, gpu_free=0, ram_available=need + 2**20)
    assert not p.fits
    assert p.max_ctx_that_fits is not None and 512 <= p.max_ctx_that_fits < 8192
    assert plan.make_plan(default_model_path, n_ctx=p.max_ctx_that_fits, offload=False, gpu_free=0,
                          ram_available=need + 2**20).fits
    tight = plan.make_plan(default_model_path, n_ctx=512, offload=False, gpu_free=0, ram_available=need - 40 * 2**20)
    assert not tight.fits and tight.max_ctx_that_fits is None
    assert "Q4_K_M" in [a["quant"] for a in tight.alternatives]
    assert any("smaller quants" in r for r in tight.reasons)


def test_oom_retry_with_fewer_layers() -> None:
    from localllm.errors import InsufficientMemoryError

    tried = []

    def load(n: int) -> str:
        tried.append(n)
        if n > 8:
            raise InsufficientMemoryError("cudaMalloc failed: out of memory")
        return f"model with {n}"

    obj, n, notes = placement.load_with_fallback(load, 31)
    assert obj == "model with 7" and n == 7 and tried == [31, 15, 7]
    assert "retried" in notes[0] and "15" in notes[0]
    with pytest.raises(InsufficientMemoryError):
        placement.load_with_fallback(lambda n: (_ for _ in ()).throw(InsufficientMemoryError("oom")), 4)


def test_plan_cli_json_and_table(default_model_path: Path) -> None:
    from click.testing import CliRunner

    from localllm.cli import cli, register_commands

    register_commands()
    r = CliRunner().invoke(cli, ["plan", str(default_model_path), "--ctx", "1024", "--json"],
                           catch_exceptions=False)
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["fits"] and d["n_ctx"] == 1024
    from localllm import runtime

    # auto on a CPU-only build is 0; on a GPU build it is what the planner places in the devices' free memory
    want = plan.make_plan(default_model_path, n_ctx=1024).gpu_layers if runtime.supports_gpu_offload() else 0
    assert d["gpu_layers"] == want
    r = CliRunner().invoke(cli, ["plan", str(default_model_path), "--ctx", "1024", "--gpu-memory", "1GiB"],
                           catch_exceptions=False)
    assert r.exit_code == 0 and "KV cache" in r.output and "GPU layers" in r.output


def test_plan_table_says_how_the_weights_are_held(default_model_path: Path) -> None:
    """--mmap counts the mapped file, --no-mmap the tensors alone; the GGUF header gives both sizes."""
    from click.testing import CliRunner

    from localllm.cli import cli, register_commands
    from localllm.cli.options import human_bytes
    from localllm.validate import read_header

    register_commands()
    h = read_header(default_model_path)
    tensors = sum(t.nbytes for t in h.tensors)
    rows = {}
    for flag in ("--mmap", "--no-mmap"):
        r = CliRunner().invoke(cli, ["plan", str(default_model_path), "--ctx", "1024", flag], catch_exceptions=False)
        assert r.exit_code == 0, r.output
        rows[flag] = r.output
    assert f"weights (mapped file)  {human_bytes(h.file_size)}" in rows["--mmap"], rows["--mmap"]
    assert f"weights (in memory)  {human_bytes(tensors)}" in rows["--no-mmap"], rows["--no-mmap"]
    ram = {f: json.loads(CliRunner().invoke(cli, ["plan", str(default_model_path), "--ctx", "1024", f, "--json"],
                                            catch_exceptions=False).output)["ram_bytes"] for f in rows}
    assert ram["--mmap"] - ram["--no-mmap"] == h.file_size - tensors


def test_a_model_half_again_larger_than_memory_is_planned_and_never_loaded(default_model_path: Path,
                                                                           tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A GGUF at least 1.5 × this machine's RAM (Llama-3.1-70B's widths at Q4_K_M's types, as many
    layers as that takes; a sparse file): the plan says it does not fit and what would, and every
    door refuses it with that one line before llama.cpp reads a byte (mapped, it would load and
    then page from disk for every token)."""
    import math

    from localllm import Model, hardware, runtime
    from localllm.errors import InsufficientMemoryError

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sparse_gguf

    ram = hardware.memory()["total"]
    layers = math.ceil(1.5 * ram / sparse_gguf.layer_bytes("llama-3.1-70b"))
    big = tmp_path / "big.gguf"
    length = sparse_gguf.widen(default_model_path, big, "llama-3.1-70b", n_layer=layers)
    assert length >= 1.5 * ram and big.stat().st_blocks * 512 < 256 * 2**20  # a hole, not data

    p = plan.make_plan(big, n_ctx=4096, offload=False, gpu_free=0)
    assert not p.fits and p.ram_bytes > length and p.max_ctx_that_fits is None and not p.alternatives
    assert any(r.startswith("no quant of it fits: even Q2_K would need") for r in p.reasons), p.reasons

    def must_not_load(*a: object, **k: object) -> None:
        raise AssertionError("llama.cpp was asked to load a model that does not fit")

    monkeypatch.setattr(runtime, "LlamaModel", must_not_load)
    with pytest.raises(InsufficientMemoryError, match=r"the model needs [0-9.]+ GiB of RAM \(mapped.* in all"):
        Model(str(big))
    r = subprocess.run([sys.executable, "-m", "localllm", "run", str(big), "hi"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith(f"error: {big}: the model needs"), r.stderr
    assert "no quant of it fits" in lines[0]


_RESERVED = """
import sys
from localllm import runtime
path, n_ctx, fa = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "on"
m = runtime.LlamaModel(path)
c = runtime.Context(m, n_ctx=n_ctx, n_threads=2, flash_attn=fa)
print([ln for ln in runtime.log_tail(400) if "CPU compute buffer size" in ln][-1].split("=")[1].split()[0])
"""


@pytest.mark.parametrize("fa", ["on", "off"])
def test_compute_buffer_with_flash_attention_on_and_off(default_model_path: Path, fa: str) -> None:
    """Without flash attention llama.cpp holds a micro-batch's attention scores over every cell: at
    16,384 cells they are most of the compute buffer (326 MiB against 98 with it on, for SmolLM2).
    The plan's reservation is checked against llama.cpp's own log line."""
    env = {**os.environ, "GGML_VK_VISIBLE_DEVICES": "", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", _RESERVED, str(default_model_path), "16384", fa], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, check=True, env=env)
    logged = float(out.stdout.strip().splitlines()[-1]) * 2**20
    est = plan.estimate(plan.read_header(default_model_path), 16384, flash_attn=fa == "on")
    assert abs(est.compute_reserved_bytes - logged) <= 0.05 * logged, (est.compute_reserved_bytes, logged)
    # and the plan of loading with it off counts it (the scores are touched once a batch attends over all)
    p = plan.make_plan(default_model_path, n_ctx=16384, offload=False, gpu_free=0, flash_attn=fa == "on")
    assert (p.compute_bytes >= 0.95 * logged) == (fa == "off"), (p.compute_bytes, logged)
