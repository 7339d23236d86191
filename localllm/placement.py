"""Choosing how many layers go to the GPU (``n_gpu_layers``).

``"auto"`` asks the memory planner; on a build without GPU offload it is 0,
with the reason recorded in :func:`explain`.

Example:
    >>> choose_gpu_layers("m.gguf", 0, None)
    0
"""

from __future__ import annotations

import os

from localllm.errors import InvalidArgumentError

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


def choose_gpu_layers(path: str | os.PathLike[str], requested: str | int, n_ctx: int | None) -> int:
    """Resolve ``requested`` (N, "auto", "all") to a layer count for llama.cpp."""
    req = parse_gpu_layers(requested)
    if isinstance(req, int):
        return req
    from localllm import runtime

    if not runtime.supports_gpu_offload():
        return 0  # CPU-only build: nothing to place
    if req == "all":
        return ALL_LAYERS
    from localllm import plan

    return plan.make_plan(path, n_ctx=n_ctx).gpu_layers
