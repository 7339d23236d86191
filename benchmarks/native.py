"""Build llama.cpp's own tools (llama-bench, llama-server) for side-by-side
benchmarks, from the llama.cpp source inside the pinned llama-cpp-python
sdist. Everything goes into a cache directory, never into git.

Usage:
    python benchmarks/native.py llama-bench llama-server     # prints the binaries' paths
    python benchmarks/native.py --source                     # only fetches the source (./test does)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

PIN = "llama-cpp-python==0.3.36"


def cache_dir() -> Path:
    base = os.environ.get("LOCALLLM_BENCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "localllm-bench")
    return Path(base)


def repack_flags(tool: str) -> list[str]:
    """Flags that put a native tool's weights in the same buffers as our runtime's: no extra buffer
    types where the build has AMX (their matmul crashes on prompt batches; runtime._lib.extra_buffers_usable)."""
    from localllm import runtime

    if runtime.extra_buffers_usable():
        return []
    return ["--repack", "0"] if tool == "llama-bench" else ["--no-repack"]


def source_dir() -> Path:
    """llama.cpp's source from the sdist (downloaded once from PyPI)."""
    root = cache_dir()
    src = root / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if src.is_dir():
        return src
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PIN,
                    "-d", str(root)], check=True, stdout=subprocess.DEVNULL)
    with tarfile.open(next(root.glob("llama_cpp_python-0.3.36.tar.gz"))) as tf:
        tf.extractall(root, filter="data")
    return src


def build(*targets: str) -> dict[str, Path]:
    """Build ``targets`` (CPU, native flags, same as the wheel pip built) and return their paths."""
    src = source_dir()
    bdir = cache_dir() / "build"
    out = {t: bdir / "bin" / t for t in targets}
    missing = [t for t, p in out.items() if not p.exists()]
    if missing:
        if shutil.which("cmake") is None:
            raise SystemExit("cmake is needed to build llama.cpp's tools")
        subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release",
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_OPENSSL=OFF"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(bdir), "--config", "Release", "-j", str(os.cpu_count() or 2),
                        "--target", *missing], check=True, stdout=subprocess.DEVNULL)
    return out


if __name__ == "__main__":
    if sys.argv[1:] == ["--source"]:  # only the source (./test fetches it for the tokenizer anchor tests)
        print(source_dir())
        sys.exit(0)
    for name, path in build(*(sys.argv[1:] or ["llama-bench"])).items():
        print(f"{name}: {path}")
