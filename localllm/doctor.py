"""``localllm doctor``: can this machine run models, and how well?

The report is a plain dict (the ``--json`` output). Keys:

- ``cpu``: model, arch, logical_cores, usable_cores, flags {name: bool}
- ``build``: llama_cpp_python version, system_info (llama.cpp's own line),
  features {name: bool} it was compiled for, missing_on_cpu [names],
  gpu_offload (bool), rebuild (command or null)
- ``gpu``: devices [{name, description, type, memory_free, memory_total}] (the GPU ones),
  backends [the same for every backend device llama.cpp sees, the CPU included],
  offload (bool: a GPU backend found a device), compiled [GPU backends built in, e.g. "Vulkan"], gpu_rebuild {vulkan, cuda, metal} commands when offload is not compiled in
- ``memory``: total, available (bytes)
- ``disk``: path (the model store), total, free (bytes)
- ``model`` (with ``--model``): the memory plan (see :mod:`localllm.plan`)
- ``problems``: [{severity: "error"|"warning", message, fix}]
- ``ok``: false when an ``error`` problem blocks running

Example:
    >>> report()["ok"]                                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
from typing import Any

from localllm import hardware, settings

# llama.cpp system_info name → the /proc/cpuinfo flag it needs
BUILD_TO_CPU = {"SSE3": "sse3", "SSSE3": "ssse3", "AVX": "avx", "AVX2": "avx2", "F16C": "f16c", "FMA": "fma",
                "AVX512": "avx512f", "AVX512_VNNI": "avx512_vnni", "AVX512_BF16": "avx512_bf16",
                "AVX_VNNI": "avx_vnni", "AMX_INT8": "amx_int8", "NEON": "neon", "DOTPROD": "dotprod",
                "MATMUL_INT8": "i8mm", "SVE": "sve"}
PIN = "llama-cpp-python==0.3.36"
REBUILD_NATIVE = f'CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --force-reinstall --no-cache-dir {PIN}'
REBUILD_CUDA = f'CMAKE_ARGS="-DGGML_CUDA=on" pip install --force-reinstall --no-cache-dir {PIN}'
REBUILD_METAL = f'CMAKE_ARGS="-DGGML_METAL=on" pip install --force-reinstall --no-cache-dir {PIN}'
REBUILD_VULKAN = f'CMAKE_ARGS="-DGGML_VULKAN=on" pip install --force-reinstall --no-cache-dir {PIN}'
# in a checkout, ./run and ./test build the backend into the venv (scripts/bootstrap.sh, docs/gpu.md)
CHECKOUT_GPU = "LOCALLLM_GPU={} ./run doctor"
MIN_RAM = 512 * 2**20
MIN_DISK = 1 * 2**30


def parse_system_info(info: str) -> dict[str, bool]:
    """``"CPU : AVX = 1 | AVX2 = 1 | ..."`` → ``{"AVX": True, "AVX2": True, ...}``."""
    feats: dict[str, bool] = {}
    for part in info.replace("\n", "|").split("|"):
        if "=" in part:
            k, _, v = part.rpartition("=")
            k = k.split(":")[-1].strip()
            if k:
                feats[k] = v.strip() == "1"
    return feats


def _gpu_hardware() -> str | None:
    """A GPU this machine has, from its device nodes (Linux) or the chip (Apple silicon); None if none seen."""
    import glob
    import platform

    if glob.glob("/dev/nvidia[0-9]*"):
        return "cuda"
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return "metal"
    if glob.glob("/dev/dri/renderD*"):
        return "vulkan"
    return None


def _gpu_section(problems: list[dict[str, str | None]]) -> tuple[bool, dict[str, Any]]:
    """Offload, the devices llama.cpp sees, and a problem when a GPU goes unused."""
    from localllm import runtime

    offload = runtime.supports_gpu_offload()   # a GPU backend with a device: layers can be offloaded
    backends = runtime.gpu_backends()          # compiled in, device or not
    devices = runtime.backend_devices()
    gpus = [d for d in devices if d["type"] in ("gpu", "igpu")]
    hw = _gpu_hardware()
    if not backends and hw:
        problems.append({"severity": "warning",
                         "message": f"this machine has a GPU ({hw}) that this CPU-only llama.cpp build cannot use",
                         "fix": {"cuda": REBUILD_CUDA, "metal": REBUILD_METAL}.get(hw, REBUILD_VULKAN)
                         + f" (in a checkout: {CHECKOUT_GPU.format(hw)})"})
    if backends and not gpus:
        problems.append({"severity": "warning",
                         "message": f"{', '.join(backends)} is compiled in, but llama.cpp sees no GPU device: every "
                                    "layer stays on the CPU",
                         "fix": "check the GPU driver; a CPU Vulkan device (Mesa's lavapipe) is used only "
                                "with GGML_VK_VISIBLE_DEVICES=0"})
    rebuild = None if backends else {"vulkan": REBUILD_VULKAN, "cuda": REBUILD_CUDA, "metal": REBUILD_METAL}
    return offload, {"devices": gpus, "backends": devices, "offload": offload, "compiled": backends,
                     "gpu_rebuild": rebuild}


def report(model: str | os.PathLike[str] | None = None, *, n_ctx: int | None = None,
           models_dir: str | None = None) -> dict[str, Any]:
    """Collect the doctor report (see module docstring for keys); with ``model`` (a GGUF path: the
    CLI resolves names), whether it fits. ``models_dir``: the store whose disk is checked."""
    from localllm import runtime

    problems: list[dict[str, str | None]] = []
    cpu = hardware.cpu()
    info = runtime.system_info()
    feats = parse_system_info(info)
    missing = [name for name, on in feats.items()
               if on and name in BUILD_TO_CPU and BUILD_TO_CPU[name] in cpu["flags"] and not cpu["flags"][BUILD_TO_CPU[name]]]
    if missing:
        problems.append({"severity": "error",
                         "message": f"llama.cpp was built for {', '.join(missing)}, which this CPU lacks "
                                    "(it would crash with 'illegal instruction')",
                         "fix": REBUILD_NATIVE})
    unused = [name for name, on in feats.items()
              if not on and name in BUILD_TO_CPU and cpu["flags"].get(BUILD_TO_CPU[name])]
    if unused:
        problems.append({"severity": "warning",
                         "message": f"this CPU has {', '.join(unused)} but llama.cpp was built without it (slower)",
                         "fix": REBUILD_NATIVE})
    offload, gpu = _gpu_section(problems)
    mem = hardware.memory()
    if mem["total"] and mem["available"] < MIN_RAM:
        problems.append({"severity": "error", "message": f"only {mem['available'] / 2**20:.0f} MiB of RAM is free",
                         "fix": "close other programs"})
    store = settings.models_dir(models_dir)
    disk = hardware.disk_free(store)
    if disk["free"] < MIN_DISK:
        problems.append({"severity": "warning", "message": f"only {disk['free'] / 2**30:.1f} GiB free at {store}",
                         "fix": "free disk space or set LOCALLLM_HOME to a larger disk"})
    out: dict[str, Any] = {
        "cpu": cpu,
        "build": {"llama_cpp_python": runtime.llama_cpp_version(), "system_info": info.strip(), "features": feats,
                  "missing_on_cpu": missing, "gpu_offload": offload,
                  "cpu_variant": runtime.cpu_variant(), "rebuild": REBUILD_NATIVE if missing else None,
                  # repacked/AMX weight buffers: off where the build has AMX (they crash; runtime._lib)
                  "extra_buffers": runtime.extra_buffers_usable()},
        "gpu": gpu,
        "memory": mem,
        # the kernel's THP mode, whether loading asks for huge pages, and whether it reads the weights into them
        "huge_pages": {"thp_mode": runtime.thp_mode(), "asked": runtime.hugepages_wanted(),
                       "weights_in_memory": hardware.weights_in_memory()},
        "disk": disk,
        "problems": problems,
    }
    if model is not None:
        from localllm import plan

        path = os.fspath(model)
        p = plan.make_plan(path, n_ctx=n_ctx)
        out["model"] = p.to_dict()
        if not p.fits:
            fixes = [f"use --ctx {p.max_ctx_that_fits}"] if p.max_ctx_that_fits else []
            fixes += [f"use a {', '.join(a['quant'] for a in p.alternatives)} quant"] if p.alternatives else []
            fix = " or ".join(fixes) or "use a smaller model"
            problems.append({"severity": "error", "message": f"{os.path.basename(path)} does not fit: "
                             + "; ".join(p.reasons), "fix": fix})
    out["ok"] = not any(p["severity"] == "error" for p in problems)
    return out
