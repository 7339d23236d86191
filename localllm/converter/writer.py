"""Writing GGUF files: streamed tensor by tensor, to a temporary file next to
the output, renamed into place only when complete.

Example:
    >>> with atomic_output(Path("out.gguf")) as tmp:              # doctest: +SKIP
    ...     write_gguf(tmp, arch="llama", kv=..., vocab=..., tensors=...)
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from localllm.converter.tensors import OutTensor
from localllm.errors import DiskFullError

Q = gguf.GGMLQuantizationType


def _anonymous_fd(directory: Path) -> int | None:
    """An unnamed file in ``directory`` (Linux ``O_TMPFILE``), or None where the
    OS or filesystem has none. It has no directory entry until it is linked, so
    not even SIGKILL or a power cut can leave it behind."""
    flag = getattr(os, "O_TMPFILE", None)
    if flag is None or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR, 0o644)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
            return None
        raise


def _disk_full(e: OSError, out: Path) -> BaseException:
    if e.errno == errno.ENOSPC:
        return DiskFullError(f"{out.parent}: the disk is full; nothing was written to {out}",
                             hint="free some space or write elsewhere (-o)", path=str(out))
    return e


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(out: Path) -> None:
    # named temp files exist only where O_TMPFILE does not; a killed run's are
    # removed by the next one (the pid in the name says whether its owner lives)
    for p in out.parent.glob(f".{glob.escape(out.name)}.*.*"):
        pid = p.name[len(out.name) + 2:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                p.unlink()


@contextlib.contextmanager
def scratch_file(out: Path, tag: str) -> Iterator[Path]:
    """A path to write a file that must never outlive this process (e.g. the
    intermediate before llama.cpp quantizes): unnamed where the OS allows it.

    Example:
        >>> with scratch_file(Path("out.gguf"), "f32") as mid:      # doctest: +SKIP
        ...     write_gguf(mid, ...)
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = _anonymous_fd(out.parent)
    if fd is not None:
        try:
            yield Path(f"/proc/self/fd/{fd}")
        except OSError as e:
            raise _disk_full(e, out) from None
        finally:
            os.close(fd)
        return
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{tag}")
    try:
        yield tmp
    except OSError as e:
        raise _disk_full(e, out) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _copy_fd(fd: int, dst: Path) -> None:
    size = os.fstat(fd).st_size
    with open(dst, "wb") as f:
        off = 0
        while off < size:
            off += os.sendfile(f.fileno(), fd, off, size - off)


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """A path to write ``out``'s content to; it becomes ``out`` only on success,
    so ``out`` is complete or absent. On Linux the file is unnamed (O_TMPFILE)
    until then, so Ctrl-C, SIGKILL or a full disk leave no temp file either;
    elsewhere it is ``.OUT.<pid>.partial``, removed on failure or by the next run.

    Example:
        >>> with atomic_output(Path("out.gguf")) as tmp:          # doctest: +SKIP
        ...     tmp.write_bytes(b"GGUF...")
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    fd = _anonymous_fd(out.parent)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        if fd is not None:
            yield Path(f"/proc/self/fd/{fd}")
            # link the finished file under a temp name, then rename it over out
            # (linkat cannot replace; the named window is two syscalls long)
            dfd = os.open(out.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.link(f"/proc/self/fd/{fd}", tmp.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=True)
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise
                _copy_fd(fd, tmp)  # a filesystem that refuses the link: copy instead
            finally:
                os.close(dfd)
        else:
            yield tmp
        os.replace(tmp, out)
    except OSError as e:
        raise _disk_full(e, out) from None
    finally:
        if fd is not None:
            os.close(fd)
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


class _Chunked:
    """What ``GGUFWriter.write_tensor_data`` needs of a tensor (``nbytes`` and
    ``tofile``), produced row chunk by row chunk so a large tensor is never
    whole in memory. Written through the file's ``write``: numpy's ``tofile``
    turns a full disk into "N requested and 0 written" with no errno, which
    would hide ENOSPC (and the clear DiskFullError)."""

    def __init__(self, t: OutTensor) -> None:
        self.t = t
        self.nbytes = t.nbytes
        self.written = 0

    def tofile(self, fid: Any) -> None:
        for chunk in self.t.chunks():
            fid.write(memoryview(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)))
            self.written += chunk.nbytes
            del chunk


def disk_nearly_full(path: Path, margin: int = 64 << 20) -> bool:
    """Whether the disk holding ``path`` has less than ``margin`` bytes free
    (llama.cpp reports a failed write without its cause; this supplies it)."""
    try:
        return shutil.disk_usage(path if path.is_dir() else path.parent).free < margin
    except OSError:
        return False


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
            data = _Chunked(t)
            w.write_tensor_data(data)  # type: ignore[arg-type]
            if data.written != t.nbytes:  # the header promised nbytes: the file would be corrupt
                raise RuntimeError(f"{t.name}: computed {data.written} bytes, planned {t.nbytes}")
            if t.source is not None:
                t.source.release()
            if on_tensor:
                on_tensor(t)
        w.flush()
    finally:
        w.close()


_SCALAR_SIZES = {gguf.GGUFValueType.UINT8: 1, gguf.GGUFValueType.INT8: 1, gguf.GGUFValueType.BOOL: 1,
                 gguf.GGUFValueType.UINT16: 2, gguf.GGUFValueType.INT16: 2, gguf.GGUFValueType.UINT32: 4,
                 gguf.GGUFValueType.INT32: 4, gguf.GGUFValueType.FLOAT32: 4, gguf.GGUFValueType.UINT64: 8,
                 gguf.GGUFValueType.INT64: 8, gguf.GGUFValueType.FLOAT64: 8}


def patch_u32(path: Path, values: dict[str, int]) -> None:
    """Overwrite uint32 metadata values of a written GGUF in place. Same size, so
    nothing moves: this lets a result known only after writing (the tokenizer
    probe) go into the file without writing it twice. The keys must come before
    the first array (write them first), so only a few entries are read.

    Example:
        >>> patch_u32(Path("m.gguf"), {"localllm.tokenizer_probe.cases": 96})   # doctest: +SKIP
    """
    left = dict(values)
    with open(path, "r+b") as f:
        magic, _version, _n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a little-endian GGUF file")
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            key = f.read(klen).decode("utf-8")
            (vtype,) = struct.unpack("<I", f.read(4))
            if key in left:
                if vtype != gguf.GGUFValueType.UINT32:
                    raise ValueError(f"{path}: {key} is not a uint32")
                f.write(struct.pack("<I", left.pop(key)))
                if not left:
                    return
            elif vtype == gguf.GGUFValueType.STRING:
                (n,) = struct.unpack("<Q", f.read(8))
                f.seek(n, os.SEEK_CUR)
            elif vtype in _SCALAR_SIZES:
                f.seek(_SCALAR_SIZES[gguf.GGUFValueType(vtype)], os.SEEK_CUR)
            else:
                break  # an array: the keys were not written first
    raise KeyError(f"{path}: keys not found before the first array: {sorted(left)}")


def _skip_value(f: Any, vtype: int) -> None:
    """Seek past one metadata value (arrays and strings without reading them)."""
    V = gguf.GGUFValueType
    if vtype == V.STRING:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(n, os.SEEK_CUR)
    elif vtype == V.ARRAY:
        etype, count = struct.unpack("<IQ", f.read(12))
        if etype in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[gguf.GGUFValueType(etype)] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(f, etype)
    else:
        f.seek(_SCALAR_SIZES[gguf.GGUFValueType(vtype)], os.SEEK_CUR)


def tensor_types(path: Path) -> dict[str, int]:
    """How many tensors of each type a GGUF holds (shows llama.cpp's fallbacks).
    Streams past the metadata (a 262k vocabulary and a 33 MB tokenizer.json)
    instead of mapping it, so it adds nothing to peak memory.

    Example:
        >>> tensor_types(Path("m.gguf"))                     # doctest: +SKIP
        {'F32': 61, 'Q8_0': 211}
    """
    out: dict[str, int] = {}
    with open(path, "rb", buffering=1 << 16) as f:
        _magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        for _ in range(n_kv):
            (klen,) = struct.unpack("<Q", f.read(8))
            f.seek(klen, os.SEEK_CUR)
            (vtype,) = struct.unpack("<I", f.read(4))
            _skip_value(f, vtype)
        for _ in range(n_tensors):
            (nlen,) = struct.unpack("<Q", f.read(8))
            f.seek(nlen, os.SEEK_CUR)
            (ndim,) = struct.unpack("<I", f.read(4))
            f.seek(8 * ndim, os.SEEK_CUR)
            qtype, _offset = struct.unpack("<IQ", f.read(12))
            name = gguf.GGMLQuantizationType(qtype).name
            out[name] = out.get(name, 0) + 1
    return out
