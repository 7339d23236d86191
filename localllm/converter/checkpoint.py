"""Reading a Hugging Face checkpoint: its config and its tensors, lazily.

Safetensors files are memory-mapped and each tensor is a zero-copy view, so
peak memory is one tensor (plus its converted copy), never the whole model.

Example:
    >>> ck = Checkpoint.open("path/to/hf-folder")            # doctest: +SKIP
    >>> ck.tensors["model.norm.weight"].load().shape         # doctest: +SKIP
    (576,)
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from localllm.errors import CheckpointError, PrerequisiteError

# safetensors dtype name → (numpy dtype of the raw data, bytes per element)
_ST_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "F64": np.dtype("<f8"), "I64": np.dtype("<i8"), "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_MAX_HEADER = 100 << 20  # a safetensors header larger than this is corrupt, not big


def read_json(path: Path) -> Any:
    """Parse a JSON file; a syntax error names the file and the position."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: bad JSON at line {e.lineno} column {e.colno}: {e.msg}",
                              hint="re-download the checkpoint", path=str(path)) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text", hint="re-download the checkpoint",
                              path=str(path)) from None


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) → float32, exactly (bf16 is the top half of f32).

    Example:
        >>> bf16_to_f32(np.array([0x3F80], dtype=np.uint16))
        array([1.], dtype=float32)
    """
    return (raw.astype(np.uint32) << 16).view(np.float32)


@dataclass
class TensorRef:
    """One tensor in a checkpoint file, not yet read."""

    name: str
    dtype: str  # safetensors spelling: F32, F16, BF16, ...
    shape: tuple[int, ...]
    file: Path
    _loader: Callable[[], np.ndarray] = field(repr=False, default=None)  # type: ignore[assignment]
    _release: Callable[[int, int], None] | None = field(repr=False, default=None)  # (byte offset, length)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1

    def release(self, rows: slice | None = None) -> None:
        """Drop this tensor's pages (or those of ``rows``) from memory: file-backed
        pages count toward RSS until the kernel reclaims them, and we will not
        read them again."""
        if self._release is None:
            return
        nbytes = self.n_elements * _ST_DTYPES[self.dtype].itemsize
        if rows is None or not self.shape:
            self._release(0, nbytes)
            return
        row = nbytes // self.shape[0]
        lo, hi, _ = rows.indices(self.shape[0])
        self._release(lo * row, (hi - lo) * row)

    def load(self, rows: slice | None = None) -> np.ndarray:
        """The tensor (or only ``rows`` of it, read from the mapping without
        touching the rest) as float32 (float inputs) or its own dtype (integers).

        Example:
            >>> ref.load(slice(0, 2)).shape                       # doctest: +SKIP
            (2, 576)
        """
        arr = self._loader()
        if rows is not None:
            arr = arr[rows]
        if self.dtype == "BF16":
            return bf16_to_f32(arr)
        if arr.dtype in (np.float16, np.float64):
            return arr.astype(np.float32)
        return arr


class _SafetensorsFile:
    """A memory-mapped safetensors file. The header is validated against the
    file size, so a truncated download fails here, naming the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)",
                                      hint="re-download this file", path=str(path))
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)",
                                      hint="re-download this file", path=str(path))
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CheckpointError(f"{path}: corrupt safetensors header (bad JSON)",
                                      hint="re-download this file", path=str(path)) from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.mm = np.memmap(path, dtype=np.uint8, mode="r") if data_size > 0 else np.zeros(0, np.uint8)
        self.refs: dict[str, TensorRef] = {}
        for name, info in header.items():
            dt = _ST_DTYPES.get(info.get("dtype", "?"))
            if dt is None:
                raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}",
                                      path=str(path))
            shape = tuple(int(x) for x in info["shape"])
            b, e = (int(x) for x in info["data_offsets"])
            want = int(np.prod(shape)) * dt.itemsize if shape else dt.itemsize
            if e - b != want or e > data_size or b < 0:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) does not fit the file "
                    f"(bytes {b}..{e} of {data_size}); the file is truncated or corrupt",
                    hint="re-download this file", path=str(path), tensor=name)
            self.refs[name] = TensorRef(name, info["dtype"], shape, path,
                                        self._view(self.data_start + b, dt, shape),
                                        self._dropper(self.data_start + b, e - b))

    def _view(self, start: int, dt: np.dtype, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            count = int(np.prod(shape)) if shape else 1
            return self.mm[start:start + count * dt.itemsize].view(dt).reshape(shape)
        return load


    def _dropper(self, start: int, length: int) -> Callable[[int, int], None]:
        def drop(off: int, n: int) -> None:
            mm = getattr(self.mm, "_mmap", None)
            if mm is None or not hasattr(mm, "madvise") or n <= 0:
                return
            # only whole pages inside the range: a neighbour's shared page stays
            page = mmap.PAGESIZE
            lo = -(-(start + off) // page) * page
            hi = min(start + off + min(n, length - off), len(mm)) // page * page
            if hi > lo:
                with contextlib.suppress(OSError, ValueError):
                    mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        return drop


def _torch_refs(path: Path) -> dict[str, TensorRef]:
    """Tensors of a pytorch ``.bin`` (pickle) file, loaded safely (weights only)."""
    try:
        import torch
    except ImportError:
        raise PrerequisiteError(
            f"{path.parent} has only pytorch .bin weights, which need torch to read",
            hint="pip install 'localllm[verify]', or convert the checkpoint to safetensors") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle
        raise CheckpointError(f"{path}: cannot read pytorch weights ({type(e).__name__}: {e})",
                              hint="re-download this file", path=str(path)) from None
    names = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
    refs = {}
    for name, t in sd.items():
        dt = names.get(t.dtype)
        if dt is None:
            continue

        def load(t=t) -> np.ndarray:
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(np.uint16)
            return t.numpy()
        refs[name] = TensorRef(name, dt, tuple(t.shape), path, load)
    return refs


@dataclass
class Checkpoint:
    """A HF model folder: ``config`` (dict) and ``tensors`` (name → TensorRef),
    in file order."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    files: list[Path]

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Checkpoint:
        """Read config.json and index every tensor (no weights are read).

        Example:
            >>> Checkpoint.open("hf-model").config["architectures"]   # doctest: +SKIP
            ['LlamaForCausalLM']
        """
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a folder", hint="pass a Hugging Face model folder or repo id",
                                  path=str(root))
        cfg_path = root / "config.json"
        if not cfg_path.exists():
            raise CheckpointError(f"{cfg_path}: missing (every HF checkpoint has a config.json)",
                                  path=str(cfg_path))
        config = read_json(cfg_path)
        files, tensors = _index_weights(root)
        return cls(root, config, tensors, files)


def _index_weights(root: Path) -> tuple[list[Path], dict[str, TensorRef]]:
    for stem, suffix in (("model", ".safetensors"), ("pytorch_model", ".bin")):
        index = root / f"{stem}{suffix}.index.json"
        if index.exists():
            wm = read_json(index).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise CheckpointError(f"{index}: has no weight_map", path=str(index))
            files = sorted({root / f for f in wm.values()})
            missing = [f for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{missing[0]}: shard listed in {index.name} is missing "
                                      f"({len(missing)} of {len(files)} shards missing)",
                                      hint="download the missing shards", path=str(missing[0]))
            tensors = _read_files(files, suffix)
            for name, shard in wm.items():
                ref = tensors.get(name)
                if ref is None or ref.file.name != Path(shard).name:
                    raise CheckpointError(
                        f"{root / shard}: does not contain tensor {name!r} that {index.name} places there",
                        hint="the index and the shards disagree; re-download them", path=str(root / shard))
            extra = set(tensors) - set(wm)
            if extra:
                raise CheckpointError(f"{index}: shards hold tensors the index does not list, e.g. "
                                      f"{sorted(extra)[0]!r}", path=str(index))
            return files, tensors
        single = sorted(root.glob(f"{stem}*{suffix}"))
        if single:
            return single, _read_files(single, suffix)
    raise CheckpointError(f"{root}: no model*.safetensors or pytorch_model*.bin weights found",
                          hint="download the weights too, not only the config", path=str(root))


def _read_files(files: list[Path], suffix: str) -> dict[str, TensorRef]:
    tensors: dict[str, TensorRef] = {}
    for f in files:
        refs = _SafetensorsFile(f).refs if suffix == ".safetensors" else _torch_refs(f)
        for name, ref in refs.items():
            if name in tensors:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {tensors[name].file.name}",
                                      path=str(f))
            tensors[name] = ref
    return tensors


# --------------------------------------------------------------------------- config

def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal configs nest it)."""
    return config.get("text_config") or config


def rope_params(cfg: dict[str, Any], layer_type: str = "full_attention") -> dict[str, Any]:
    """Rope settings in one shape for transformers 4.x (``rope_theta``,
    ``rope_scaling``) and 5.x (``rope_parameters``, maybe per layer type).

    Example:
        >>> rope_params({"rope_theta": 5e5, "rope_scaling": None})["rope_theta"]
        500000.0
    """
    rp = cfg.get("rope_parameters")
    if isinstance(rp, dict) and layer_type in rp and isinstance(rp[layer_type], dict):
        rp = rp[layer_type]
    out: dict[str, Any] = dict(rp) if isinstance(rp, dict) else {}
    if "rope_theta" in cfg and "rope_theta" not in out:
        out["rope_theta"] = cfg["rope_theta"]
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        for k, v in scaling.items():
            out.setdefault(k, v)
        if "type" in scaling and "rope_type" not in out:
            out["rope_type"] = scaling["type"]
    out.setdefault("rope_theta", 10000.0)
    out.setdefault("rope_type", "default")
    out["rope_theta"] = float(out["rope_theta"])
    return out


def config_dtype(cfg: dict[str, Any]) -> str | None:
    """The checkpoint's declared dtype (``torch_dtype`` in 4.x, ``dtype`` in 5.x)."""
    return cfg.get("dtype") or cfg.get("torch_dtype")


def resolve_source(src: str, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub repo id, fetched (config, tokenizer
    and weights only) into the HF cache. ``HF_HUB_OFFLINE=1`` uses the cache only.

    Example:
        >>> resolve_source("/data/SmolLM2-135M")                  # doctest: +SKIP
        PosixPath('/data/SmolLM2-135M')
    """
    p = Path(src).expanduser()
    if p.exists():
        return p
    if src.count("/") != 1 or src.startswith((".", "/", "~")):
        raise CheckpointError(f"{src}: no such folder (and not a hub repo id like org/name)", path=src)
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
                "added_tokens.json", "chat_template.*", "*.safetensors", "*.safetensors.index.json"]
    try:
        path = Path(snapshot_download(src, revision=revision, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):
            # a repo with only pytorch .bin weights: fetch those too (not always,
            # since repos with both would download the same weights twice)
            path = Path(snapshot_download(src, revision=revision,
                                          allow_patterns=patterns + ["pytorch_model*.bin", "*.bin.index.json"]))
        return path
    except Exception as e:  # hub errors are many; the message says which
        raise CheckpointError(f"{src}: cannot download from the Hugging Face hub ({type(e).__name__}: {e})",
                              hint="check the repo id and network, or pass a local folder", path=src) from None
