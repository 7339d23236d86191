"""GPU offload that really runs (marker ``gpu``): on any llama.cpp build with GPU offload, Mesa's
lavapipe (a Vulkan device that runs on the CPU) included. Skipped, with the reason, on a CPU-only
build or where llama.cpp sees no GPU device.

    LOCALLLM_GPU=vulkan LOCALLLM_VENV=.venv-vulkan ./test -m gpu      # docs/gpu.md

llama.cpp skips CPU-type Vulkan devices unless ``GGML_VK_VISIBLE_DEVICES`` names them, so every check
runs in a subprocess that sets it (to 0 unless already set): the rest of the suite, in this process,
keeps its CPU-only behaviour. lavapipe is slow (about 1.3 tok/s with 10 of 30 layers on 2 cores), so
each check generates a handful of tokens."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import TESTS, free_port

pytestmark = pytest.mark.gpu

PARTIAL = 10          # layers offloaded in the partial runs (of SmolLM2-135M's 30)
N_TOKENS = 8
# the normalized mean squared error between CPU and partially offloaded logits, per generated token:
# measured 2e-5 to 4.7e-3 on lavapipe (the largest on the prompt's step; docs/gpu.md); a broken kernel
# or a wrong layer split gives errors of order 1
NMSE_BOUND = 1e-2
PLAN_TOLERANCE = 0.15


def _env() -> dict[str, str]:
    return {**os.environ, "GGML_VK_VISIBLE_DEVICES": os.environ.get("GGML_VK_VISIBLE_DEVICES", "0")}


def _py(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def doctor() -> dict:
    """``localllm doctor --json`` as the GPU tests see the machine; skips without offload or a device."""
    r = _py("-m", "localllm", "doctor", "--json")
    assert r.stdout, r.stderr
    d = json.loads(r.stdout)
    if os.environ.get("LOCALLLM_REQUIRE_GPU") and not (d["build"]["gpu_offload"] and d["gpu"]["devices"]):
        pytest.fail("LOCALLLM_REQUIRE_GPU is set (CI's Vulkan stage) but no GPU device is usable: "
                    f"{d['gpu']}")  # a broken GPU build must not pass as four skips
    if not d["gpu"]["compiled"]:
        pytest.skip("this llama.cpp build has no GPU offload (CPU only): build one with "
                    "LOCALLLM_GPU=vulkan|cuda|metal LOCALLLM_VENV=.venv-gpu ./test -m gpu (docs/gpu.md)")
    if not d["build"]["gpu_offload"] or not d["gpu"]["devices"]:
        pytest.skip(f"{', '.join(d['gpu']['compiled'])} is compiled in, but llama.cpp sees no GPU device here "
                    f"(GGML_VK_VISIBLE_DEVICES={_env()['GGML_VK_VISIBLE_DEVICES']!r})")
    return d


def _nmse(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean((ref - got) ** 2) / np.mean(ref ** 2))


def test_doctor_lists_the_device_and_offload(doctor: dict) -> None:
    assert doctor["build"]["gpu_offload"] is True and doctor["gpu"]["offload"] is True
    gpu = doctor["gpu"]["devices"][0]
    assert gpu["type"] in ("gpu", "igpu") and gpu["memory_total"] > 0 and 0 < gpu["memory_free"] <= gpu["memory_total"]
    assert any(d["type"] == "cpu" for d in doctor["gpu"]["backends"])  # the CPU is a backend device too
    assert doctor["gpu"]["gpu_rebuild"] is None and doctor["gpu"]["compiled"]
    if os.environ.get("LOCALLLM_GPU") == "vulkan" and "nvidia" not in gpu["description"].lower():
        print("device:", gpu["name"], gpu["description"])
    text = _py("-m", "localllm", "doctor").stdout
    assert "GPU offload  yes: " in text and gpu["description"] in text and f"{gpu['name']} ({gpu['type']})" in text


def test_partial_offload_greedy_matches_cpu(doctor: dict, tmp_path: Path) -> None:
    # Q8_0, the model NMSE_BOUND was measured on: the default model's version depends on the CPU (Q6_K on the
    # AMX Xeon VM, where the bound's 1e-2 was exceeded once, 1.1e-2, with the same tokens)
    from localllm import resolve

    path = resolve.resolve("smollm2-135m:q8_0")
    runs = {}
    for n in (0, PARTIAL):
        r = _py(str(TESTS / "gpu_probe.py"), "greedy", str(path), str(n), str(N_TOKENS),
                str(tmp_path / f"{n}.npy"))
        assert r.returncode == 0, r.stderr[-2000:]
        runs[n] = json.loads(r.stdout)
    cpu, gpu = runs[0], runs[PARTIAL]
    assert gpu["log_offloaded"] and f"offloaded {PARTIAL}/" in gpu["log_offloaded"], gpu["log_offloaded"]
    assert cpu["log_offloaded"] is None or "offloaded 0/" in cpu["log_offloaded"]
    ref, got = np.load(tmp_path / "0.npy"), np.load(tmp_path / f"{PARTIAL}.npy")
    same = next((i for i, (a, b) in enumerate(zip(cpu["tokens"], gpu["tokens"])) if a != b), N_TOKENS)
    # the logits agree up to the first differing token (afterwards the two runs see different inputs)
    errors = [_nmse(ref[i], got[i]) for i in range(min(same + 1, N_TOKENS))]
    print(f"tokens cpu {cpu['tokens']} gpu {gpu['tokens']}; NMSE per step {['%.1e' % e for e in errors]}")
    assert max(errors) <= NMSE_BOUND
    if same < N_TOKENS:  # a near tie that the backend's rounding tipped: allowed only within the bound
        top2 = np.sort(ref[same])[-2:]
        assert top2[1] - top2[0] < 0.1, f"token {same} differs without a near tie: {cpu['tokens']} {gpu['tokens']}"


def test_serve_reports_the_offloaded_layers(doctor: dict, default_model_path: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {**_env(), "LOCALLLM_VERBOSE": "1"}  # llama.cpp's own log on stderr: to a file, a pipe would fill
    log = (tmp_path / "serve.log").open("w")
    p = subprocess.Popen([sys.executable, "-m", "localllm", "serve", "--model-path", str(default_model_path),
                          "--port", str(port), "--gpu-layers", "7", "--ctx", "256", "--parallel", "1",
                          "--no-prompt-cache"], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline and p.poll() is None, "the server did not come up"
            time.sleep(0.5)
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            meta = json.load(r)["data"][0]["meta"]
    finally:
        p.terminate()
        p.wait(timeout=60)
        log.close()
    err = (tmp_path / "serve.log").read_text()
    assert meta["gpu_layers"] == 7 and meta["gpu_layers_requested"] == 7
    said = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", err)
    assert said and said[-1][0] == "7", err[-3000:]
    # the split it reports is the one llama.cpp logged: the output head and the last repeating layers
    repeating = re.findall(r"offloading (\d+) repeating layers to GPU", err)
    n_layer = int(said[-1][1]) - 1
    first = n_layer - int(repeating[-1])
    assert "offloading output layer to GPU" in err
    assert meta["layer_split"] == f"GPU: output head, layers {first}-{n_layer - 1}; CPU: token embeddings, " \
                                  f"layers 0-{first - 1}", meta["layer_split"]


def test_gpu_memory_caps_auto_and_the_plan_matches(doctor: dict, default_model_path: Path) -> None:
    from localllm import plan

    free = doctor["gpu"]["devices"][0]["memory_free"]
    full = plan.make_plan(default_model_path, n_ctx=512, offload=True, gpu_free=free)
    assert full.gpu_layers == full.n_layer + 1  # the small model fits whole without a cap
    # room for the compute buffer, the output head (llama.cpp offloads it first) and about a third of the layers
    est = plan.estimate(plan.read_header(default_model_path), 512)
    cap = plan._GPU_HEADROOM + est.compute_reserved_bytes + est.output_head_bytes + sum(est.layer_bytes) // 3
    r = _py("-m", "localllm", "plan", str(default_model_path), "--ctx", "512", "--gpu-memory", str(cap), "--json")
    assert r.returncode == 0, r.stderr
    want = json.loads(r.stdout)
    assert 0 < want["gpu_layers"] < want["n_layer"], want["reasons"]
    # twice, measured the second time: a driver compiles its shaders on first use and keeps them in its
    # disk cache (Mesa's ~/.cache/mesa_shader_cache). lavapipe compiles with LLVM in this process: with
    # that cache cold, RSS grew 476 MiB instead of 330 (the plan: 302), the CI's first run failed on it
    for _ in range(2):
        r = _py(str(TESTS / "gpu_probe.py"), "auto", str(default_model_path), str(cap))
        assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    assert got["info"]["gpu_layers"] == want["gpu_layers"] and got["info"]["gpu_memory"] == cap
    assert f"offloaded {want['gpu_layers']}/" in got["log_offloaded"]
    device = sum(got["device_buffers"].values())
    rss = got["rss"] - got["rss_before"]
    print(f"{want['gpu_layers']} layers: plan VRAM {want['vram_bytes'] / 2**20:.1f} MiB, llama.cpp's device "
          f"buffers {device / 2**20:.1f} MiB {got['device_buffers']}; plan RAM+VRAM "
          f"{(want['ram_bytes'] + want['vram_bytes']) / 2**20:.1f} MiB, RSS grew {rss / 2**20:.1f} MiB")
    assert abs(device - want["vram_bytes"]) <= PLAN_TOLERANCE * want["vram_bytes"]
    if "llvmpipe" in doctor["gpu"]["devices"][0]["description"]:  # lavapipe's device memory is this process's
        total = want["ram_bytes"] + want["vram_bytes"]
        assert abs(rss - total) <= PLAN_TOLERANCE * total
