"""What this machine has: CPU model and flags, cores, RAM, disk, huge pages. Read from
the OS (``/proc/cpuinfo``, ``/proc/meminfo``, ``sysctl`` on macOS), not from
llama.cpp, so a mismatch with the build can be seen.

Example:
    >>> "avx2" in cpu()["flags"]                       # doctest: +SKIP
    True
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

# The flags that matter to ggml's CPU kernels, under their /proc/cpuinfo names.
X86_FLAGS = ("sse3", "ssse3", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8", "amx_bf16")
ARM_FLAGS = ("neon", "dotprod", "i8mm", "sve", "fp16")
# /proc/cpuinfo spells some of them differently on ARM (asimd = NEON, asimddp = dotprod)
_ARM_ALIASES = {"pni": "sse3", "asimd": "neon", "asimddp": "dotprod", "fphp": "fp16", "i8mm": "i8mm", "sve": "sve"}
# sysctl hw.optional keys on macOS
_MAC_KEYS = {"hw.optional.neon": "neon", "hw.optional.arm.FEAT_DotProd": "dotprod",
             "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_FP16": "fp16",
             "hw.optional.avx2_0": "avx2", "hw.optional.avx1_0": "avx", "hw.optional.fma": "fma",
             "hw.optional.avx512f": "avx512f", "hw.optional.sse3": "sse3", "hw.optional.f16c": "f16c"}


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu() -> dict[str, Any]:
    """CPU model, logical/usable cores and the relevant instruction-set flags."""
    machine = platform.machine().lower()
    model, flags = platform.processor() or machine, set()
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text(errors="replace").splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and val.strip():
                model = val.strip()
            elif key in ("flags", "features"):
                for f in val.split():
                    flags.add(_ARM_ALIASES.get(f, f))
    elif platform.system() == "Darwin":
        model = _sysctl("machdep.cpu.brand_string") or model
        for key, name in _MAC_KEYS.items():
            if _sysctl(key) == "1":
                flags.add(name)
    wanted = ARM_FLAGS if machine in ("arm64", "aarch64") else X86_FLAGS
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {"model": model, "arch": machine, "logical_cores": os.cpu_count() or 1, "usable_cores": usable,
            "flags": {f: f in flags for f in wanted}}


def memory() -> dict[str, int]:
    """RAM total and available, in bytes (cgroup limits respected on Linux)."""
    total = avail = 0
    mi = Path("/proc/meminfo")
    if mi.exists():
        vals = {}
        for line in mi.read_text().splitlines():
            k, _, v = line.partition(":")
            parts = v.split()
            if parts:
                vals[k] = int(parts[0]) * 1024
        total, avail = vals.get("MemTotal", 0), vals.get("MemAvailable", vals.get("MemFree", 0))
        # a container's memory limit is the real ceiling
        for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),):
            try:
                lim = Path(limit_file).read_text().strip()
                if lim != "max" and int(lim) < total:
                    used = int(Path(usage_file).read_text().strip())
                    total, avail = int(lim), min(avail, int(lim) - used)
            except (OSError, ValueError):
                pass
    elif platform.system() == "Darwin":
        total = int(_sysctl("hw.memsize") or 0)
        try:
            out = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout
            page = 16384 if "page size of 16384" in out else 4096
            free = sum(int(line.split()[-1].rstrip(".")) for line in out.splitlines()
                       if line.startswith(("Pages free", "Pages inactive", "Pages speculative")))
            avail = free * page
        except (OSError, ValueError, subprocess.SubprocessError):
            avail = total
    return {"total": total, "available": avail}


def disk_free(path: Path) -> dict[str, Any]:
    """Free space on the filesystem holding ``path`` (or its nearest existing parent)."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    u = shutil.disk_usage(p)
    return {"path": str(path), "total": u.total, "free": u.free}


_THP_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The kernel's transparent-huge-pages mode (``always``, ``madvise`` or ``never``), None without THP."""
    try:
        text = _THP_FILE.read_text()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None


def weights_in_memory() -> bool:
    """Whether loading reads the weights into memory instead of mapping the file (``mmap`` auto).

    Read into memory, the weights can sit in 2 MiB pages: the loader asks for them where the THP
    mode is ``madvise``, and the kernel gives them unasked where it is ``always``. A mapped file
    stays in the page cache's 4 KiB pages, and the decode, which streams every weight once per
    token, then misses the TLB on every page: reading made decode 3-16 % faster on an AVX-512
    EPYC (``benchmarks/hugepages_bench.py``), for one copy of the weights at load.
    Mapping is kept off Linux, where THP is ``never`` or absent, and with ``LOCALLLM_HUGEPAGES=0``.

    Example:
        >>> weights_in_memory() in (True, False)
        True
    """
    from localllm import settings

    return sys.platform == "linux" and settings.hugepages() and thp_mode() in ("madvise", "always")
