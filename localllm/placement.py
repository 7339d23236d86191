"""Choosing how many layers go to the GPU (``n_gpu_layers``).

``"auto"`` asks the memory planner; on a build without GPU offload it is 0,
with the reason given by :func:`explain`. :func:`load_with_fallback` retries
a load that ran out of GPU memory with fewer layers, and says so.

Example:
    >>> choose_gpu_layers("m.gguf", 0, None)
    0
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from localllm.errors import InsufficientMemoryError, InvalidArgumentError
from localllm.formats import parse_size

if TYPE_CHECKING:
    from localllm.validate import Header

T = TypeVar("T")

ALL_LAYERS = 10_000  # llama.cpp clamps to the model's layer count (+ output layer)


def parse_gpu_layers(value: str | int) -> int | str:
    """Parse a ``--gpu-layers`` value: N, ``auto`` or ``all``."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise InvalidArgumentError("gpu layers must be >= 0, 'auto' or 'all'", param="gpu_layers")
        return value
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("auto", "all"):
            return v
        if v.isdigit():
            return int(v)
    raise InvalidArgumentError(f"gpu layers must be a number >= 0, 'auto' or 'all', not {value!r}",
                               param="gpu_layers")


def parse_gpu_memory(value: str | int | None) -> int | None:
    """Parse a ``--gpu-memory`` cap with the one size parser (:func:`localllm.formats.parse_size`:
    ``512MB`` is 512·10⁶ bytes, ``512MiB`` and ``512M`` 512·2²⁰); None: no cap.

    Example:
        >>> parse_gpu_memory("2GiB"), parse_gpu_memory(512 * 2**20), parse_gpu_memory(None)
        (2147483648, 536870912, None)
    """
    return None if value is None else parse_size(value, "gpu_memory")


def choose_gpu_layers(path: str | os.PathLike[str] | Header, requested: str | int, n_ctx: int | None) -> int:
    """Resolve ``requested`` (N, "auto", "all") to a layer count for llama.cpp."""
    return explain(path, requested, n_ctx)[0]


def explain(path: str | os.PathLike[str] | Header, requested: str | int, n_ctx: int | None,
            gpu_memory: int | None = None, cache_types: tuple[str, str] = ("f16", "f16")) -> tuple[int, str]:
    """``requested`` as a layer count, and why.

    Example:
        >>> explain("m.gguf", "auto", 2048)                # doctest: +SKIP
        (0, 'auto = 0 GPU layers: this llama.cpp build has no GPU offload (CPU only)')
    """
    req = parse_gpu_layers(requested)
    if isinstance(req, int):
        return req, f"{req} layers, as requested"
    from localllm import runtime

    if not runtime.supports_gpu_offload():
        compiled = ", ".join(runtime.gpu_backends())
        return 0, (f"{req} = 0 GPU layers: no GPU offload ({compiled} is compiled in, but llama.cpp sees no GPU device)"
                   if compiled else f"{req} = 0 GPU layers: this llama.cpp build has no GPU offload (CPU only)")
    if req == "all":
        return ALL_LAYERS, "all layers, as requested"
    from localllm import plan

    p = plan.make_plan(path, n_ctx=n_ctx, gpu_memory=gpu_memory, cache_type_k=cache_types[0],
                       cache_type_v=cache_types[1])
    return p.gpu_layers, "; ".join(r for r in p.reasons if "layers" in r) or f"auto = {p.gpu_layers} layers"


def load_with_fallback(load: Callable[[int], T], gpu_layers: int,
                       n_layer: int | None = None) -> tuple[T, int, list[str]]:
    """``load(gpu_layers)``; when the GPU runs out of memory, halve the layers and retry
    (down to 0). Returns the result, the layers that worked, and a note per retry
    (the caller shows them: the library never prints).

    Example:
        >>> model, n, notes = load_with_fallback(lambda n: runtime.LlamaModel(p, n_gpu_layers=n), 33)  # doctest: +SKIP
    """
    notes: list[str] = []
    n = gpu_layers
    while True:
        try:
            return load(n), n, notes
        except InsufficientMemoryError as e:
            if n <= 0:
                raise
            if n_layer is not None and n > n_layer + 1:
                n = n_layer + 1  # "all": start halving from the real count
            fewer = n // 2
            notes.append(f"loading with {n} GPU layers ran out of memory ({e}); retried with {fewer}")
            n = fewer
