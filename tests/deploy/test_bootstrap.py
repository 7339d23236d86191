"""`./run` on a machine missing a prerequisite says which one and how to install it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT


def _sandbox(tmp_path: Path, tools: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A copy of the bootstrap scripts and a PATH holding only ``tools``."""
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    for f in ("run", "setup.cfg", "scripts/bootstrap.sh", "scripts/vulkan_headers.sh"):
        shutil.copy2(ROOT / f, proj / f)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name in ("bash", "cat", "cksum", "cut", "grep", "dirname", "id", "mkdir", "rm"):
        found = shutil.which(name)
        if found:
            (bindir / name).symlink_to(found)
    for name, target in tools.items():
        (bindir / name).symlink_to(target)
    return proj, {"PATH": str(bindir), "HOME": str(tmp_path)}


def _run(proj: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([env["PATH"] + "/bash", str(proj / "run"), "--version"], env=env,
                          capture_output=True, text=True, timeout=120)


def test_no_python(tmp_path: Path) -> None:
    old = tmp_path / "python3"
    old.write_text("#!/bin/sh\nexit 1\n")  # a Python that fails the 3.10 check
    old.chmod(0o755)
    proj, env = _sandbox(tmp_path, {"python3": str(old)})
    r = _run(proj, env)
    assert r.returncode == 1
    assert "Python 3.10 or newer is required" in r.stderr
    assert "apt install" in r.stderr and "dnf install" in r.stderr and "brew install" in r.stderr


def test_no_compiler_then_no_cmake(tmp_path: Path) -> None:
    proj, env = _sandbox(tmp_path, {"python3": sys.executable})
    r = _run(proj, env)
    assert r.returncode == 1
    assert "C/C++ compiler is required" in r.stderr and "build-essential" in r.stderr
    assert "xcode-select --install" in r.stderr
    os.symlink(shutil.which("gcc") or shutil.which("cc") or "/usr/bin/gcc", Path(env["PATH"]) / "cc")
    r = _run(proj, env)
    assert r.returncode == 1
    assert "cmake is required" in r.stderr and "brew install cmake" in r.stderr
    assert len(r.stderr.splitlines()) < 10  # a short message, never a wall of compiler output


def _gpu_args(tmp_path: Path, gpu: str, tools: dict[str, str], include: Path | None = None
              ) -> subprocess.CompletedProcess:
    proj, env = _sandbox(tmp_path, tools)
    for name in ("uname",):
        found = shutil.which(name)
        if found and not (Path(env["PATH"]) / name).exists():
            (Path(env["PATH"]) / name).symlink_to(found)
    env = {**env, "LOCALLLM_GPU": gpu, **({"VULKAN_INCLUDE_DIR": str(include)} if include else {})}
    return subprocess.run([env["PATH"] + "/bash", "-c", f"source {proj}/scripts/bootstrap.sh; gpu_cmake_args"],
                          env=env, capture_output=True, text=True, timeout=60)


def _headers(tmp_path: Path, version: int) -> Path:
    inc = tmp_path / f"inc{version}"
    (inc / "vulkan").mkdir(parents=True)
    (inc / "vulkan" / "vulkan.h").write_text("")
    (inc / "vulkan" / "vulkan_core.h").write_text(f"#define VK_HEADER_VERSION {version}\n")
    return inc


def test_gpu_builds_take_the_right_flags_or_say_what_to_install(tmp_path: Path) -> None:
    fake = tmp_path / "fake-tool"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    r = _gpu_args(tmp_path / "a", "cuda", {})
    assert r.returncode == 1 and "needs the CUDA toolkit (nvcc)" in r.stderr and "nvidia-cuda-toolkit" in r.stderr
    r = _gpu_args(tmp_path / "b", "cuda", {"nvcc": str(fake)})
    assert r.returncode == 0 and r.stdout.strip() == "-DGGML_CUDA=ON"
    r = _gpu_args(tmp_path / "c", "vulkan", {})
    assert r.returncode == 1 and "glslc" in r.stderr and "libvulkan-dev" in r.stderr
    r = _gpu_args(tmp_path / "d", "vulkan", {"glslc": str(fake)}, _headers(tmp_path, 239))   # Debian 12's
    assert r.returncode == 1 and "1.3.239" in r.stderr and "1.3.255 or newer" in r.stderr
    inc = _headers(tmp_path, 309)   # Debian 13's
    r = _gpu_args(tmp_path / "e", "vulkan", {"glslc": str(fake)}, inc)
    assert r.returncode == 0 and r.stdout.strip() == f"-DGGML_VULKAN=ON -DVulkan_INCLUDE_DIR={inc}"
    if os.uname().sysname != "Darwin":
        r = _gpu_args(tmp_path / "f", "metal", {})
        assert r.returncode == 1 and "needs macOS" in r.stderr
    r = _gpu_args(tmp_path / "g", "rocm", {})
    assert r.returncode == 1 and "must be vulkan, cuda or metal" in r.stderr
    r = _gpu_args(tmp_path / "h", "", {})
    assert r.returncode == 0 and r.stdout == ""


def _fake_apt(tmp_path: Path) -> dict[str, str]:
    """apt-get and dpkg stand-ins: apt-get logs its arguments and 'downloads' a .deb; dpkg -x unpacks
    Debian 13's header layout (vulkan_core.h 1.4.309, spirv/, SPIRV-Headers' CMake config)."""
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    log = tmp_path / "apt.log"
    (bindir / "apt-get").write_text(f"""#!/bin/bash
echo "$@" >> {log}
for a in "$@"; do case "$a" in Dir::Etc::SourceList=*) cat "${{a#*=}}" >> {log};; esac; done
case " $* " in *" download "*) : > libvulkan-dev_1.4.309.0-1_amd64.deb;; esac
""")
    (bindir / "dpkg").write_text("""#!/bin/bash
[ "$1" = -x ] || exit 1
mkdir -p "$3/usr/include/vulkan" "$3/usr/include/spirv" "$3/usr/share/cmake/SPIRV-Headers"
: > "$3/usr/include/vulkan/vulkan.h"
echo "#define VK_HEADER_VERSION 309" > "$3/usr/include/vulkan/vulkan_core.h"
""")
    tools = {}
    for name in ("apt-get", "dpkg"):
        (bindir / name).chmod(0o755)
        tools[name] = str(bindir / name)
    for name in ("awk", "find", "head", "env"):
        if shutil.which(name):
            tools[name] = shutil.which(name)
    return tools


def test_vulkan_on_debian_12_fetches_newer_headers_into_a_cache(tmp_path: Path) -> None:
    """Too-old system headers (Debian 12's 1.3.239) and apt: scripts/vulkan_headers.sh unpacks Debian 13's
    into ~/.cache/localllm-vulkan from the mirror in the apt sources, and the build is pointed there."""
    core = Path("/usr/include/vulkan/vulkan_core.h")
    m = re.search(r"VK_HEADER_VERSION (\d+)", core.read_text()) if core.exists() else None
    if m and int(m.group(1)) >= 255:
        pytest.skip("this machine's Vulkan headers are new enough: nothing is fetched")
    sources = tmp_path / "debian.sources"
    sources.write_text("Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
                       "Components: main\n")
    fake = tmp_path / "glslc"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    proj, env = _sandbox(tmp_path / "s", {"glslc": str(fake), **_fake_apt(tmp_path)})
    env = {**env, "LOCALLLM_GPU": "vulkan", "LOCALLLM_APT_SOURCES": str(sources)}
    r = subprocess.run([env["PATH"] + "/bash", "-c", f"source {proj}/scripts/bootstrap.sh; gpu_cmake_args"],
                       env=env, capture_output=True, text=True, timeout=60)
    cache = Path(env["HOME"]) / ".cache" / "localllm-vulkan" / "usr"
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"-DGGML_VULKAN=ON -DVulkan_INCLUDE_DIR={cache}/include -DCMAKE_PREFIX_PATH={cache}"
    log = (tmp_path / "apt.log").read_text()
    assert "deb http://mirror.example/debian trixie main" in log and "download libvulkan-dev spirv-headers" in log
    assert "Dir::State::Lists=" in log   # apt's own state stays untouched
    (tmp_path / "apt.log").unlink()
    r = subprocess.run([env["PATH"] + "/bash", "-c", f"source {proj}/scripts/bootstrap.sh; gpu_cmake_args"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and not (tmp_path / "apt.log").exists()   # cached: apt is not asked again


def test_run_stops_on_a_bad_gpu_choice_before_building(tmp_path: Path) -> None:
    proj, env = _sandbox(tmp_path, {"python3": sys.executable})
    r = subprocess.run([env["PATH"] + "/bash", str(proj / "run"), "--version"], env={**env, "LOCALLLM_GPU": "rocm"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "must be vulkan, cuda or metal" in r.stderr
    assert not (proj / ".venv").exists()   # nothing was created or built
