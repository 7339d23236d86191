"""llama.cpp's quantizer."""

from __future__ import annotations

import ctypes
import os

import numpy as np

from localllm.errors import ModelLoadError
from localllm.runtime._lib import C, _backend

# --------------------------------------------------------------------------- quantize

def quantize(src: str | os.PathLike[str], dst: str | os.PathLike[str], ftype: int, *,
             nthread: int = 0, allow_requantize: bool = True, imatrix: dict[str, np.ndarray] | None = None) -> None:
    """Quantize GGUF ``src`` into ``dst`` with llama.cpp (``ftype`` is a
    ``gguf.LlamaFileType`` value, e.g. 7 for Q8_0). ``imatrix`` maps tensor
    names to per-column importance (see :mod:`localllm.converter.imatrix`).

    Example:
        >>> quantize("f16.gguf", "q8.gguf", 7)          # doctest: +SKIP
    """
    sink = _backend()
    params = C.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    params.allow_requantize = bool(allow_requantize)
    keep = []  # the arrays must outlive the call
    if imatrix:
        entries = (C.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            entries[i].name = name.encode()
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None  # the list ends at a null name
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, type(params.imatrix))
    mark = sink.mark()
    rc = C.llama_model_quantize(os.fsencode(os.fspath(src)), os.fsencode(os.fspath(dst)),
                                ctypes.byref(params))
    del keep
    if rc != 0:
        lines = sink.since(mark)
        tail = next((ln for ln in reversed(lines) if ln.strip()), "no log")
        raise ModelLoadError(f"quantizing {src} failed: {tail.strip()}",
                             hint="run with LOCALLLM_VERBOSE=1 to see llama.cpp's log", path=str(src))


