"""The one import of ``llama_cpp``; its log, load-failure explanations and build facts."""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
import threading
from collections import deque
from pathlib import Path

import llama_cpp as C

from localllm import settings
from localllm.errors import InsufficientMemoryError, InvalidModelFileError, ModelLoadError, UnsupportedArchitectureError

LLAMA_CPP_PYTHON_VERSION = C.__version__

# ggml_log_level values (ggml.h)
_LOG_ERROR = 4
_LOG_WARN = 3
_LOG_DEBUG = 1


class _LogSink:
    """Receives llama.cpp's log. Lines are kept (last 400) so a failed load can
    be explained; they reach stderr only with LOCALLLM_VERBOSE=1, because
    llama.cpp prints hundreds of lines per model load."""

    def __init__(self) -> None:
        self.lines: deque[tuple[int, str]] = deque(maxlen=400)
        self.count = 0  # lines ever received: marks stay valid after the deque wraps
        self.lock = threading.Lock()
        self._partial = ""
        self.callback = C.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        msg = text.decode("utf-8", "replace") if text else ""
        if level == _LOG_DEBUG:  # a graph reserve logs hundreds of these: they would push out what matters
            if settings.verbose():
                sys.stderr.write(msg)
            return
        with self.lock:
            self._partial += msg
            if "\n" in self._partial:
                *done, self._partial = self._partial.split("\n")
                for line in done:
                    self.lines.append((level, line))
                    self.count += 1
        if settings.verbose():
            sys.stderr.write(msg)

    def mark(self) -> int:
        with self.lock:
            return self.count

    def since(self, mark: int, level: int | None = None) -> list[str]:
        """Lines logged after ``mark`` (at most the last 400), only those of ``level`` if given."""
        with self.lock:
            n = min(self.count - mark, len(self.lines))
            kept = list(self.lines)[len(self.lines) - n:] if n > 0 else []
            return [line for lv, line in kept if level is None or lv == level]


@functools.cache
def _backend() -> _LogSink:
    """Initialise llama.cpp once per process and install our log sink."""
    sink = _LogSink()
    C.llama_log_set(sink.callback, ctypes.c_void_p(0))
    C.llama_backend_init()
    _load_dl_backends()
    return sink


def _backend_dirs() -> list[Path]:
    """Where a GGML_BACKEND_DL build of llama-cpp-python puts its ``libggml-cpu-*.so`` variants:
    ``llama_cpp/lib`` or the wheel's ``bin/`` (site-packages/bin); $LOCALLLM_GGML_BACKEND_DIR first."""
    here = Path(C.__file__).resolve().parent
    dirs = [here / "lib", here.parent / "bin", here.parent / "lib"]
    env = os.environ.get("LOCALLLM_GGML_BACKEND_DIR")
    return ([Path(env)] if env else []) + dirs


def _load_dl_backends() -> None:
    """Load llama.cpp's backends when it was built with ``GGML_BACKEND_DL=ON`` (the container
    image: ``GGML_CPU_ALL_VARIANTS`` builds one CPU library per instruction set and ggml picks
    the best this CPU runs). Such a build registers no backend by itself and llama-cpp-python
    0.3.36 does not load them; an ordinary build already has its CPU backend linked in."""
    ggml = _ggml_lib()
    if ggml is None:
        return
    ggml.ggml_backend_reg_count.restype = ctypes.c_size_t
    if ggml.ggml_backend_reg_count() > 0:
        return
    ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
    ggml.ggml_backend_load_all_from_path.restype = None
    for d in _backend_dirs():
        if d.is_dir() and any(d.glob("*ggml-cpu*")):
            ggml.ggml_backend_load_all_from_path(str(d).encode())
            return


def cpu_variant() -> str | None:
    """The CPU variant a ``GGML_CPU_ALL_VARIANTS`` build loaded (``haswell``, ``icelake``, ...),
    from ggml's "loaded CPU backend from .../libggml-cpu-VARIANT.so"; None for an ordinary build."""
    sink = _backend()
    with sink.lock:
        lines = [line for _lv, line in sink.lines]
    for line in lines:
        m = re.search(r"loaded CPU backend from \S*ggml-cpu-([A-Za-z0-9_]+)\.", line)
        if m:
            return m.group(1)
    return None


# llama.cpp's summary lines after the real reason: never the reason themselves
_GENERIC_LOAD = ("failed to load model", "failed to read tensor data")


def _load_reason(lines: list[str], errors: list[str]) -> str:
    """The line of llama.cpp's load log that says why, without its function-name prefix."""
    def clean(line: str) -> str:
        line = " ".join(line.split())
        head, sep, rest = line.partition(": ")
        return rest if sep and head.isidentifier() and rest else line

    for ln in lines:
        if "error loading model:" in ln:
            detail = ln.split("error loading model:", 1)[1]
            if not any(g in detail.lower() for g in _GENERIC_LOAD):
                return clean(detail)
    for ln in errors:
        if ln.strip() and not any(g in ln.lower() for g in _GENERIC_LOAD):
            return clean(ln)
    return next((ln.strip() for ln in reversed(lines) if "error" in ln.lower() or "failed" in ln.lower()),
                lines[-1].strip() if lines else "no log")


def _explain_load_failure(path: Path, lines: list[str], errors: list[str] | None = None) -> Exception:
    """Map llama.cpp's load log to our exception classes (the one place that
    reads llama.cpp's messages). ``errors``: the error-level lines among ``lines``."""
    text = "\n".join(lines)
    low = text.lower()
    tail = _load_reason(lines, errors or [])
    if "unknown model architecture" in low:
        arch = ""
        for ln in lines:
            if "unknown model architecture" in ln.lower():
                arch = ln.split("'")[1] if ln.count("'") >= 2 else ""
        return UnsupportedArchitectureError(
            f"{path}: architecture {arch!r} is not supported by this llama.cpp build "
            f"(llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})",
            hint="convert the model with a supported architecture, or upgrade localllm",
            path=str(path), arch=arch)
    if ("not within the file bounds" in low or "truncated" in low or "failed to read" in low
            or "invalid magic" in low or "gguf_init" in low or "unexpected eof" in low):
        return InvalidModelFileError(f"{path}: not a valid GGUF file ({tail})",
                                     hint="re-download or re-convert the model", path=str(path))
    if "out of memory" in low or "failed to allocate" in low or "unable to allocate" in low:
        return InsufficientMemoryError(f"{path}: not enough memory to load the model ({tail})",
                                       hint="use a smaller context (--ctx) or a smaller quant",
                                       path=str(path))
    return ModelLoadError(f"{path}: llama.cpp could not load the model ({tail})",
                          hint="run with LOCALLLM_VERBOSE=1 to see llama.cpp's log", path=str(path))


# --------------------------------------------------------------------------- build facts

def system_info() -> str:
    """llama.cpp's own description of what it was compiled for."""
    _backend()
    return C.llama_print_system_info().decode("utf-8", "replace")


def amx_compiled() -> bool:
    """Whether this llama.cpp build has ggml's AMX kernels (built for a CPU with AMX-INT8)."""
    return "AMX_INT8 = 1" in system_info()


def extra_buffers_usable() -> bool:
    """Whether weights may go to llama.cpp's extra buffer types (``use_extra_bufts``: repacked layouts).

    Not where the build has AMX, unless ``LOCALLLM_AMX=1``: ggml puts the AMX buffer type first, so it
    takes Q4_0, Q4_1, Q8_0 and the K-quants, and its matmul crashes the process (SIGSEGV in
    ggml_backend_amx_mul_mat) on every batch of 2 tokens or more on the AMX Xeon dev VM
    (llama.cpp issue 20824 is open; tests/core/test_runtime_amx.py decodes a prompt batch in a child
    process, which died with signal 11 before this rule). The extra
    buffer types are one switch, so the repacked layouts go with it: a crash-free load instead."""
    from localllm import settings

    return not amx_compiled() or settings.amx()


def supports_gpu_offload() -> bool:
    _backend()
    return bool(C.llama_supports_gpu_offload())


_GPU_LIBS = {"vulkan": "Vulkan", "cuda": "CUDA", "metal": "Metal", "hip": "ROCm", "sycl": "SYCL", "opencl": "OpenCL"}


def gpu_backends() -> list[str]:
    """The non-CPU backends compiled into (or loaded by) this llama.cpp build, e.g. ``["Vulkan"]``,
    whether or not they found a device (``supports_gpu_offload`` is true only when one did)."""
    _backend()
    lib = _ggml_lib()
    if lib is None:
        return []
    lib.ggml_backend_reg_get.restype = ctypes.c_void_p
    lib.ggml_backend_reg_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_reg_name.restype = ctypes.c_char_p
    lib.ggml_backend_reg_name.argtypes = [ctypes.c_void_p]
    names = [(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)) or b"").decode()
             for i in range(lib.ggml_backend_reg_count())]
    names = [n for n in names if n and n.upper() not in ("CPU", "BLAS", "RPC")]
    # a backend that failed to register (e.g. a bad GGML_VK_VISIBLE_DEVICES) is still compiled in: its library
    files = {p.name for p in (Path(C.__file__).parent / "lib").glob("*ggml-*")}
    for key, name in _GPU_LIBS.items():
        if name not in names and any(f"ggml-{key}." in f for f in files):
            names.append(name)
    return names


def llama_cpp_version() -> str:
    return LLAMA_CPP_PYTHON_VERSION


@functools.cache
def _ggml_lib() -> ctypes.CDLL | None:
    """libggml from llama-cpp-python's wheel, for the backend-device API that
    llama-cpp-python does not bind."""
    libdir = Path(C.__file__).parent / "lib"
    # a wheel holds libggml.so, .so.0 and .so.0.x as separate copies (zip has no symlinks); libllama
    # links the soname (.so.0), so that is the copy whose backend registry llama.cpp uses
    for name in ("libggml.so.0", "libggml.so", "libggml.dylib", "ggml.dll"):
        p = libdir / name
        if p.exists():
            lib = ctypes.CDLL(str(p))
            lib.ggml_backend_dev_count.restype = ctypes.c_size_t
            lib.ggml_backend_dev_get.restype = ctypes.c_void_p
            lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
            for fn in ("ggml_backend_dev_name", "ggml_backend_dev_description"):
                getattr(lib, fn).restype = ctypes.c_char_p
                getattr(lib, fn).argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_type.restype = ctypes.c_int
            lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
            lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                                    ctypes.POINTER(ctypes.c_size_t)]
            return lib
    return None


_DEV_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}


def backend_devices() -> list[dict]:
    """ggml backend devices: name, description, type and memory (bytes).

    Example:
        >>> backend_devices()[0]["type"]            # doctest: +SKIP
        'cpu'
    """
    _backend()
    lib = _ggml_lib()
    if lib is None:
        return []
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append({
            "name": (lib.ggml_backend_dev_name(dev) or b"").decode(),
            "description": (lib.ggml_backend_dev_description(dev) or b"").decode(),
            "type": _DEV_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            "memory_free": int(free.value),
            "memory_total": int(total.value),
        })
    return out


def log_tail(n: int = 20) -> list[str]:
    """The last lines llama.cpp logged (for diagnostics)."""
    sink = _backend()
    with sink.lock:
        return [line for _, line in list(sink.lines)[-n:]]


def time_us() -> int:
    return int(C.llama_time_us())



def grammar_tools():
    """llama-cpp-python's GBNF helpers (JSON schema → grammar)."""
    from llama_cpp import llama_grammar

    return llama_grammar
