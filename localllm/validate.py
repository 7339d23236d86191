"""A bounded GGUF header check that runs before llama.cpp sees a file.

llama.cpp's GGUF parser has had heap-overflow advisories, and a file is
untrusted input. This reads the header only (never the tensor data) and
checks: magic and version; key/value and tensor counts plausible for the
file size; every string and array length inside the file; known value and
tensor types; tensor shapes, offsets and extents inside the data section; no
overlapping tensors.

Example:
    >>> h = read_header("model.gguf")                      # doctest: +SKIP
    >>> h.arch, h.quant, h.parameters                     # doctest: +SKIP
    ('llama', 'Q8_0', 134515008)
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import InvalidModelFileError, ModelNotFoundError

MAGIC = b"GGUF"
# value type → (struct code, size); 8 = string, 9 = array
_SCALARS = {0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
            6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8)}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 4096           # numeric arrays up to this length are kept (per-layer values)
_MAX_DIMS = 4
_MIN_KV_BYTES = 8 + 1 + 4 + 1    # key length, 1-char key, type, smallest value
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int      # absolute offset in the file
    nbytes: int


@dataclass
class Header:
    path: Path
    version: int
    file_size: int
    data_offset: int
    alignment: int
    metadata: dict[str, Any] = field(default_factory=dict)
    array_lengths: dict[str, int] = field(default_factory=dict)  # every array key → its length
    tensors: list[TensorInfo] = field(default_factory=list)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", "unknown"))

    def get(self, key: str, default: Any = None) -> Any:
        """Arch-scoped lookup: ``get("block_count")`` reads ``<arch>.block_count``."""
        return self.metadata.get(f"{self.arch}.{key}", self.metadata.get(key, default))

    @property
    def quant(self) -> str:
        ft = self.metadata.get("general.file_type")
        if ft is None:
            return "unknown"
        import gguf

        try:
            return gguf.LlamaFileType(int(ft)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            return f"type {ft}"

    @property
    def parameters(self) -> int:
        n = 0
        for t in self.tensors:
            p = 1
            for d in t.shape:
                p *= d
            n += p
        return n


def _fail(path: Path, what: str) -> InvalidModelFileError:
    return InvalidModelFileError(f"{path}: not a valid GGUF file: {what}",
                                 hint="re-download or re-convert the model", path=str(path), reason=what)


class _Reader:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise _fail(self.path, f"{what} runs past the end of the file (truncated?)")

    def scalar(self, code: str, n: int, what: str) -> Any:
        self.need(n, what)
        v = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise _fail(self.path, f"{what} is not UTF-8") from None

    def skip_string(self, what: str) -> None:
        n = self.u64(f"length of {what}")
        self.need(n, what)
        self.pos += n


def read_header(path: str | os.PathLike[str]) -> Header:
    """Parse and bounds-check a GGUF header; raise InvalidModelFileError naming the problem."""
    import gguf  # the ggml type table (block size, bytes per block)

    p = Path(path)
    try:
        f = open(p, "rb")
    except FileNotFoundError:
        raise ModelNotFoundError(f"model file {p} does not exist", path=str(p)) from None
    except IsADirectoryError:
        raise InvalidModelFileError(f"{p} is a directory, not a .gguf file", path=str(p)) from None
    except PermissionError:
        raise InvalidModelFileError(f"{p}: permission denied", path=str(p)) from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            if size >= 4 and f.read(4) != MAGIC:
                raise _fail(p, "it does not start with the GGUF magic (is it a GGUF file?)")
            raise _fail(p, f"only {size} bytes long")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return _parse(mm, p, size, gguf.GGML_QUANT_SIZES)


def _parse(mm: mmap.mmap, p: Path, size: int, qsizes: dict) -> Header:
    r = _Reader(mm, p)
    if mm[:4] != MAGIC:
        raise _fail(p, "it does not start with the GGUF magic (is it a GGUF file?)")
    r.pos = 4
    version = r.u32("version")
    if version not in (2, 3):
        raise _fail(p, f"unsupported GGUF version {version} (expected 2 or 3)")
    n_tensors = r.u64("tensor count")
    n_kv = r.u64("key/value count")
    if n_kv * _MIN_KV_BYTES > size:
        raise _fail(p, f"implausible key/value count {n_kv} for a {size}-byte file")
    if n_tensors * _MIN_TENSOR_BYTES > size:
        raise _fail(p, f"implausible tensor count {n_tensors} for a {size}-byte file")
    h = Header(path=p, version=version, file_size=size, data_offset=0, alignment=32)
    seen: set[str] = set()
    for i in range(n_kv):
        key = r.string(f"key #{i}")
        if not key or key in seen:  # llama.cpp rejects both; a duplicate could shadow a checked value
            raise _fail(p, f"key #{i} {key!r} is empty or appears twice")
        seen.add(key)
        vtype = r.u32(f"type of {key!r}")
        if vtype in _SCALARS:
            code, n = _SCALARS[vtype]
            h.metadata[key] = r.scalar(code, n, f"value of {key!r}")
        elif vtype == _STRING:
            h.metadata[key] = r.string(f"value of {key!r}")
        elif vtype == _ARRAY:
            etype = r.u32(f"element type of {key!r}")
            count = r.u64(f"length of {key!r}")
            h.array_lengths[key] = count
            if etype in _SCALARS:
                code, n = _SCALARS[etype]
                r.need(count * n, f"array {key!r}")
                if count <= _KEEP_ARRAY:
                    h.metadata[key] = list(struct.unpack_from(f"<{count}{code}", mm, r.pos))
                r.pos += count * n
            elif etype == _STRING:
                r.need(count * 8, f"array {key!r}")
                r.pos = _skip_strings(mm, r.pos, count, size, p, key)
            else:
                raise _fail(p, f"array {key!r} has unsupported element type {etype}")
        else:
            raise _fail(p, f"key {key!r} has unknown value type {vtype}")
    align = h.metadata.get("general.alignment", 32)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1) or align > 1 << 20:
        raise _fail(p, f"general.alignment {align!r} is not a power of two")
    h.alignment = align
    raw_tensors = []
    for i in range(n_tensors):
        name = r.string(f"name of tensor #{i}")
        n_dims = r.u32(f"dimension count of {name!r}")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise _fail(p, f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS} allowed)")
        shape = tuple(r.u64(f"shape of {name!r}") for _ in range(n_dims))
        ttype = r.u32(f"type of {name!r}")
        offset = r.u64(f"offset of {name!r}")
        raw_tensors.append((name, shape, ttype, offset))
    data_offset = (r.pos + align - 1) // align * align
    if data_offset > size:
        raise _fail(p, "the header runs past the end of the file (truncated?)")
    h.data_offset = data_offset
    names = set()
    for name, shape, ttype, offset in raw_tensors:
        if name in names:
            raise _fail(p, f"tensor {name!r} appears twice")
        names.add(name)
        try:
            block, bytes_per_block = qsizes[ttype]
        except KeyError:
            raise _fail(p, f"tensor {name!r} has unknown type {ttype}") from None
        if any(d == 0 or d > 1 << 40 for d in shape):
            raise _fail(p, f"tensor {name!r} has an implausible shape {shape}")
        if shape[0] % block:
            raise _fail(p, f"tensor {name!r}: row length {shape[0]} is not a multiple of its block size {block}")
        n = 1
        for d in shape:
            n *= d
        nbytes = n // block * bytes_per_block
        if offset % align:
            raise _fail(p, f"tensor {name!r} is not aligned to {align} bytes")
        start = data_offset + offset
        if start + nbytes > size:
            raise _fail(p, f"tensor {name!r} extends past the end of the file (truncated?)")
        h.tensors.append(TensorInfo(name, shape, ttype, start, nbytes))
    ordered = sorted(h.tensors, key=lambda t: t.offset)
    for a, b in zip(ordered, ordered[1:]):
        if a.offset + a.nbytes > b.offset:
            raise _fail(p, f"tensors {a.name!r} and {b.name!r} overlap")
    # llama.cpp's rule: each tensor starts where the previous one (in header order) ends, padded
    expected = data_offset
    for t in h.tensors:
        if t.offset != expected:
            raise _fail(p, f"tensor {t.name!r} starts at data offset {t.offset - data_offset}, expected "
                           f"{expected - data_offset} (the tensors must follow each other in header order)")
        expected += (t.nbytes + align - 1) // align * align
    arch = h.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise _fail(p, "general.architecture is missing or not a string")
    _check_hparams(h, p)
    return h


_MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: it aborts the process on more (or on 0)
_EPSILONS = ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon")

# hyperparameters the planner sizes buffers from: a hostile value here must not
# make *us* allocate (or llama.cpp size a buffer from) something absurd
_HPARAM_LIMITS = {"block_count": _MAX_LAYERS, "embedding_length": 1 << 20, "feed_forward_length": 1 << 22,
                  "attention.head_count": 1 << 14, "attention.head_count_kv": 1 << 14,
                  "attention.key_length": 1 << 16, "attention.value_length": 1 << 16,
                  "context_length": 1 << 27, "attention.sliding_window": 1 << 27}


def _check_hparams(h: Header, p: Path) -> None:
    for key, limit in _HPARAM_LIMITS.items():
        full = f"{h.arch}.{key}"
        if full in h.array_lengths and full not in h.metadata:
            raise _fail(p, f"{full} is an array of {h.array_lengths[full]} values (too long)")
        v = h.metadata.get(full)
        if v is None:
            continue
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= limit for x in values):
            raise _fail(p, f"{full} = {str(v)[:60]} is not an integer in 0..{limit}")
    if h.metadata.get(f"{h.arch}.block_count") == 0:
        raise _fail(p, f"{h.arch}.block_count is 0 (a model needs at least one layer)")
    for key in _EPSILONS:  # llama.cpp asserts eps >= 0 while decoding (the process aborts)
        v = h.metadata.get(f"{h.arch}.{key}")
        if v is not None and not (isinstance(v, float) and 0.0 <= v < float("inf")):
            raise _fail(p, f"{h.arch}.{key} = {v} is not a finite number >= 0")
    if isinstance(h.metadata.get(f"{h.arch}.block_count"), int):
        per_layer = [k for k in ("feed_forward_length", "attention.head_count", "attention.head_count_kv")
                     if isinstance(h.metadata.get(f"{h.arch}.{k}"), list)]
        for k in per_layer:
            if len(h.metadata[f"{h.arch}.{k}"]) < h.metadata[f"{h.arch}.block_count"]:
                raise _fail(p, f"{h.arch}.{k} has fewer entries than block_count")


def _skip_strings(buf: mmap.mmap | bytes, pos: int, count: int, size: int, p: Path, key: str) -> int:
    """Skip ``count`` length-prefixed strings (a tokenizer's vocabulary) quickly, bounds-checked."""
    unpack = struct.Struct("<Q").unpack_from
    for j in range(count):
        if pos + 8 > size:
            raise _fail(p, f"length of {key}[{j}] runs past the end of the file (truncated?)")
        pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise _fail(p, f"{key}[{j}] runs past the end of the file (truncated?)")
    return pos


def summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """arch, quant and parameter count of a GGUF (validated)."""
    h = read_header(path)
    return {"arch": h.arch, "quant": h.quant, "parameters": h.parameters,
            "name": h.metadata.get("general.name")}
