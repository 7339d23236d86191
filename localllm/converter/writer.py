"""Writing GGUF files: streamed tensor by tensor, to a temporary file next to
the output, renamed into place only when complete.

Example:
    >>> with atomic_output(Path("out.gguf")) as tmp:              # doctest: +SKIP
    ...     write_gguf(tmp, arch="llama", kv=..., vocab=..., tensors=...)
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localllm.converter.tensors import OutTensor
from localllm.errors import DiskFullError, InvalidArgumentError

Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
# --quant name → (llama.cpp file type, written directly by us?)
QUANTS: dict[str, tuple[int, bool]] = {
    "F32": (FT.ALL_F32, True), "F16": (FT.MOSTLY_F16, True), "BF16": (FT.MOSTLY_BF16, True),
    "Q8_0": (FT.MOSTLY_Q8_0, True), "Q6_K": (FT.MOSTLY_Q6_K, False), "Q5_K_M": (FT.MOSTLY_Q5_K_M, False),
    "Q5_0": (FT.MOSTLY_Q5_0, False), "Q4_K_M": (FT.MOSTLY_Q4_K_M, False), "Q4_0": (FT.MOSTLY_Q4_0, False),
}
# Q4_K_M: the usual CPU choice. CPU decoding is memory-bandwidth bound, so ~4.8
# bits/weight runs ~3x faster than F16, and K-quants keep quality close to Q5/Q6.
DEFAULT_QUANT = "Q4_K_M"


def parse_quant(name: str) -> str:
    """Normalise a ``--quant`` value (case-insensitive).

    Example:
        >>> parse_quant("q4_k_m")
        'Q4_K_M'
    """
    q = name.strip().upper()
    if q not in QUANTS:
        raise InvalidArgumentError(f"unknown quant type {name!r}; choose one of {', '.join(QUANTS)}",
                                   param="quant")
    return q


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A temp path next to ``out``, renamed onto ``out`` on success and removed
    on any failure (including Ctrl-C), so ``out`` is complete or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"{out.parent}: the disk is full; nothing was written to {out}",
                                hint="free some space or write elsewhere (-o)", path=str(out)) from None
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def check_space(path: Path, need: int) -> None:
    """Fail early (and clearly) when the output will not fit the disk."""
    free = shutil.disk_usage(path.parent if path.parent.exists() else Path.cwd()).free
    if need > free:
        raise DiskFullError(f"{path.parent}: needs about {need / 1e9:.2f} GB but only {free / 1e9:.2f} GB is free",
                            hint="free some space or write elsewhere (-o)", path=str(path))


def _add_kv(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:  # pragma: no cover - rules only produce the types above
        raise TypeError(f"{key}: cannot write {type(value).__name__}")


def write_gguf(path: Path, *, arch: str, kv: dict[str, Any], general: dict[str, Any],
               write_vocab: Callable[[gguf.GGUFWriter], None], tensors: list[OutTensor],
               on_tensor: Callable[[OutTensor], None] | None = None) -> None:
    """Write one GGUF: metadata first, then each tensor computed on demand."""
    w = gguf.GGUFWriter(path, arch)
    try:
        for k, v in general.items():
            _add_kv(w, k, v)
        for k, v in kv.items():
            _add_kv(w, f"{arch}.{k}", v)
        write_vocab(w)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file(path)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in tensors:
            data = t.compute()
            if data.nbytes != t.nbytes:
                raise RuntimeError(f"{t.name}: computed {data.nbytes} bytes, planned {t.nbytes}")
            w.write_tensor_data(data)
            del data
            if t.source is not None:
                t.source.release()
            if on_tensor:
                on_tensor(t)
        w.flush()
    finally:
        w.close()


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (shows llama.cpp's fallbacks).
    Uses the bounded header reader, which skips the vocabulary quickly."""
    from localllm import validate

    out: dict[str, int] = {}
    for t in validate.read_header(path).tensors:
        name = gguf.GGMLQuantizationType(t.type).name
        out[name] = out.get(name, 0) + 1
    return out
