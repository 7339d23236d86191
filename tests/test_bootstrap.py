"""`./run` on a machine missing a prerequisite says which one and how to install it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sandbox(tmp_path: Path, tools: dict[str, str]) -> tuple[Path, dict[str, str]]:
    """A copy of the bootstrap scripts and a PATH holding only ``tools``."""
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    for f in ("run", "setup.cfg", "scripts/bootstrap.sh"):
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
