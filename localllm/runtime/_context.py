"""Contexts: KV cache and compute buffers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import ctypes

import numpy as np

from localllm.formats import KV_TYPES
from localllm.errors import RuntimeFailure
from localllm.runtime._lib import _LOG_ERROR, C, _backend, _explain_load_failure

if TYPE_CHECKING:  # annotations only
    from localllm.runtime._model import Batch, LlamaModel

# --------------------------------------------------------------------------- context

# KV cache element types llama.cpp's CPU backend takes: name → ggml_type id (the table is formats.KV_TYPES)
KV_CACHE_TYPES = {name: t.ggml_type for name, t in KV_TYPES.items()}

# llama_get_logits_ith returning the address as an int: the row's numpy view is then looked up,
# not rebuilt. Rebuilding it (np.ctypeslib.as_array) costs ~35 us per token right after a decode,
# because the decode has evicted that Python code from the caches: 0.5 % of a decode at 150 tok/s
_logits_addr = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(
    ctypes.cast(C.llama_get_logits_ith, ctypes.c_void_p).value)
_MAX_VIEWS = 4096  # rows' views kept per context (a 2048-row batch has 2048 addresses)


class Context:
    """A llama.cpp context: KV cache + compute buffers for one model.

    ``n_seq_max`` > 1 partitions the KV cache by sequence id for batching.
    Not thread-safe: one thread drives a context.
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_threads: int, n_batch: int | None = None,
                 n_ubatch: int = 512, n_seq_max: int = 1, embeddings: bool = False, pooling: str = "mean",
                 kv_unified: bool = True, flash_attn: bool | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16") -> None:
        sink = _backend()
        self.model = model
        p = C.llama_context_default_params()
        p.n_ctx = n_ctx
        p.n_batch = n_batch or min(n_ctx, 2048)
        p.n_ubatch = min(n_ubatch, p.n_batch)
        p.n_seq_max = n_seq_max
        p.n_threads = n_threads
        p.n_threads_batch = n_threads
        p.embeddings = embeddings
        p.kv_unified = kv_unified
        p.no_perf = True
        if embeddings:  # "rank": a classifier head's scores (a reranker), one row per sequence
            p.pooling_type = C.LLAMA_POOLING_TYPE_RANK if pooling == "rank" else C.LLAMA_POOLING_TYPE_MEAN
        if flash_attn is not None:
            p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = KV_CACHE_TYPES[cache_type_k]
        p.type_v = KV_CACHE_TYPES[cache_type_v]
        mark = sink.mark()
        ptr = C.llama_init_from_model(model.ptr, p)
        if not ptr:
            raise _explain_load_failure(model.path, sink.since(mark), sink.since(mark, _LOG_ERROR))
        self._ptr = ptr
        self._views: dict[int, np.ndarray] = {}
        self._mem = C.llama_get_memory(ptr)
        self.n_ctx = int(C.llama_n_ctx(ptr))
        self.n_batch = int(C.llama_n_batch(ptr))
        self.n_seq_max = n_seq_max
        self.embeddings = embeddings

    @property
    def ptr(self):
        if self._ptr is None:
            raise RuntimeFailure("context already freed")
        return self._ptr

    def decode(self, batch: Batch) -> None:
        rc = C.llama_decode(self.ptr, batch.raw)
        if rc == 0:
            return
        if rc == 1:
            raise RuntimeFailure("the KV cache is full: no slot for this batch",
                                 hint="use a larger context (--ctx) or fewer parallel sequences")
        if rc == 2:
            raise RuntimeFailure("decoding was aborted")
        raise RuntimeFailure(f"llama_decode failed (code {rc})")

    def logits(self, i: int) -> np.ndarray:
        """A zero-copy float32 view of the logits of batch row ``i`` (valid until
        the next decode)."""
        addr = _logits_addr(self.ptr, i)
        if not addr:
            raise RuntimeFailure(f"no logits for batch row {i}")
        view = self._views.get(addr)
        if view is None:  # a view is only made of an address llama.cpp just returned, so it is never stale
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            view = self._views[addr] = np.frombuffer((ctypes.c_float * self.model.n_vocab).from_address(addr),
                                                     dtype=np.float32)
        return view

    def embedding(self, seq_id: int) -> np.ndarray:
        ptr = C.llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise RuntimeFailure("no pooled embedding for this sequence")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

    def scores(self, seq_id: int) -> np.ndarray:
        """The classifier's outputs for sequence ``seq_id`` (pooling "rank"; a reranker's first is its score)."""
        ptr = C.llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise RuntimeFailure("no scores for this sequence")
        return np.ctypeslib.as_array(ptr, shape=(max(self.model.n_cls_out, 1),)).copy()

    # -- KV cache by sequence
    @property
    def _memory(self):
        if self._ptr is None:  # the memory belongs to the context: never touch it once freed
            raise RuntimeFailure("context already freed")
        return self._mem

    def seq_rm(self, seq_id: int, p0: int = -1, p1: int = -1) -> bool:
        return bool(C.llama_memory_seq_rm(self._memory, seq_id, p0, p1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        C.llama_memory_seq_cp(self._memory, src, dst, p0, p1)

    def clear(self) -> None:
        C.llama_memory_clear(self._memory, True)

    # -- a sequence's state as bytes (the prompt cache on disk)
    def seq_state(self, seq_id: int) -> bytes:
        """The KV state of sequence ``seq_id`` (llama.cpp's own format: cells, positions, K and V)."""
        n = int(C.llama_state_seq_get_size(self.ptr, seq_id))
        buf = (ctypes.c_uint8 * n)()
        got = int(C.llama_state_seq_get_data(self.ptr, buf, n, seq_id))
        if got != n:
            raise RuntimeFailure(f"llama.cpp wrote {got} of {n} bytes of sequence {seq_id}'s state")
        return bytes(buf)

    def set_seq_state(self, seq_id: int, data: bytes | bytearray) -> bool:
        """Load ``data`` (from :meth:`seq_state`) into sequence ``seq_id``, replacing what it held.
        False when llama.cpp refuses it (another model's layout, a size that does not add up);
        the sequence is then empty."""
        self.seq_rm(seq_id, -1, -1)
        if not data:
            return False
        arr = ctypes.c_uint8 * len(data)  # a bytearray is lent to llama.cpp as it is, bytes are copied
        buf = arr.from_buffer(data) if isinstance(data, bytearray) else arr.from_buffer_copy(data)
        got = int(C.llama_state_seq_set_data(self.ptr, buf, len(data), seq_id))
        if got != len(data):
            self.seq_rm(seq_id, -1, -1)
            return False
        return True

    def close(self) -> None:
        if self._ptr is not None:
            self._views.clear()
            C.llama_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


