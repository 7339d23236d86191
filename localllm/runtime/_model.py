"""Models and batches."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from localllm.errors import InvalidArgumentError, RuntimeFailure
from localllm.runtime._hugepages import NewMemory
from localllm.runtime._lib import _LOG_ERROR, C, _backend, _explain_load_failure, extra_buffers_usable

# --------------------------------------------------------------------------- model

FIM_NAMES = ("pre", "suf", "mid", "pad", "rep", "sep")  # llama_vocab_fim_<name>: prefix, suffix, middle, ...
_LOAD_MODE_AUTO, _LOAD_MODE_NONE = -1, 0  # enum llama_load_mode: AUTO maps the file, NONE reads it into memory

class LlamaModel:
    """A loaded llama.cpp model (weights + vocabulary). Free with :meth:`close`.

    Loading is read-only, so several contexts may share one model. ``use_mmap``
    maps the file (the page cache is shared with other processes); ``False`` reads
    the weights into memory the loader backs with huge pages (runtime/_hugepages.py).
    """

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0,
                 vocab_only: bool = False, use_mmap: bool = True, use_extra_bufts: bool = True) -> None:
        sink = _backend()
        self.path = Path(path)
        params = C.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = bool(vocab_only)
        # llama.cpp 0.3.36 has load_mode, not use_mmap (a ctypes Structure takes any attribute silently)
        params.load_mode = _LOAD_MODE_AUTO if use_mmap else _LOAD_MODE_NONE
        # False keeps weights unrepacked: slower on some CPUs, but the same kernel runs for 1 and n rows;
        # never with AMX compiled in (extra_buffers_usable: its buffers crash on prompt batches)
        params.use_extra_bufts = bool(use_extra_bufts) and extra_buffers_usable()
        watch = NewMemory()  # huge pages for the buffers llama.cpp fills itself (repacked weights)

        def progress(_done: float, _user: ctypes.c_void_p) -> bool:
            watch.mark()  # the first call comes before the first tensor is read
            return True

        callback = C.llama_progress_callback(progress)  # kept alive until the load returns
        if not vocab_only:
            params.progress_callback = callback
            watch.start()
        mark = sink.mark()
        ptr = C.llama_model_load_from_file(os.fsencode(self.path), params)
        if ptr:
            watch.finish()
        self.hugepage_bytes = watch.marked
        if not ptr:
            raise _explain_load_failure(self.path, sink.since(mark), sink.since(mark, _LOG_ERROR))
        self._ptr = ptr
        self._vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(C.llama_model_n_ctx_train(ptr))
        self.n_embd = int(C.llama_model_n_embd(ptr))
        self.n_layer = int(C.llama_model_n_layer(ptr))
        self.n_params = int(C.llama_model_n_params(ptr))
        self.size = int(C.llama_model_size(ptr))
        self.bos = int(C.llama_vocab_bos(self._vocab))
        self.eos = int(C.llama_vocab_eos(self._vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self._vocab))
        self.add_eos = bool(C.llama_vocab_get_add_eos(self._vocab))
        self.add_sep = bool(C.llama_vocab_get_add_sep(self._vocab))
        self.sep = int(C.llama_vocab_sep(self._vocab))
        # fill-in-the-middle tokens as llama.cpp found them (GGUF keys tokenizer.ggml.fim_*_token_id,
        # else token texts such as <|fim_prefix|>, <fim_prefix>, <PRE>, <｜fim▁begin｜>); -1 where absent
        self.fim = {name: int(getattr(C, f"llama_vocab_fim_{name}")(self._vocab)) for name in FIM_NAMES}
        self.n_cls_out = int(C.llama_model_n_cls_out(ptr))  # classifier outputs (meaningful for classifiers only)
        self._piece_buf = ctypes.create_string_buffer(256)
        self._eog = np.zeros(self.n_vocab, dtype=bool)
        for t in range(self.n_vocab):
            if C.llama_vocab_is_eog(self._vocab, t):
                self._eog[t] = True

    # -- metadata
    def desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.ptr, buf, 256)
        return buf.value.decode("utf-8", "replace")

    def meta(self) -> dict[str, str]:
        """GGUF metadata as strings (arrays are summarised by llama.cpp)."""
        out: dict[str, str] = {}
        n = C.llama_model_meta_count(self.ptr)
        buf = ctypes.create_string_buffer(1 << 16)
        for i in range(n):
            k = C.llama_model_meta_key_by_index(self.ptr, i, buf, len(buf))
            key = buf.value.decode("utf-8", "replace") if k >= 0 else f"#{i}"
            v = C.llama_model_meta_val_str_by_index(self.ptr, i, buf, len(buf))
            out[key] = buf.value.decode("utf-8", "replace") if v >= 0 else ""
        return out

    def chat_template(self, name: str | None = None) -> str | None:
        """The GGUF's chat template (``name``: a named one, e.g. "rerank"), or None."""
        tmpl = C.llama_model_chat_template(self.ptr, name.encode() if name else None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

    @property
    def is_reranker(self) -> bool:
        """Whether the GGUF says its pooling is RANK (a cross-encoder with a classifier head:
        bge-reranker, Qwen3-Reranker, ...)."""
        meta = self.meta()
        return meta.get(f"{meta.get('general.architecture', '')}.pooling_type") == str(int(C.LLAMA_POOLING_TYPE_RANK))

    @property
    def ptr(self):
        if self._ptr is None:
            raise RuntimeFailure("model already freed")
        return self._ptr

    # -- vocabulary
    def is_eog(self, token: int) -> bool:
        return bool(self._eog[token])

    def eog_tokens(self) -> list[int]:
        """Every end-of-generation token id (EOS, EOT, ...)."""
        return [int(t) for t in np.flatnonzero(self._eog)]

    @property
    def eog_mask(self) -> np.ndarray:
        """A read-only bool mask over the vocabulary: end-of-generation tokens."""
        v = self._eog.view()
        v.flags.writeable = False
        return v

    def tokenize(self, text: str | bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8") if isinstance(text, str) else text
        cap = len(data) + 8
        while True:
            arr = (C.llama_token * cap)()
            n = C.llama_tokenize(self._vocab, data, len(data), arr, cap, add_special, parse_special)
            if n >= 0:
                return arr[:n]
            if -n <= cap:  # pragma: no cover - llama.cpp contract says -n is the size needed
                raise RuntimeFailure("tokenizer failed")
            cap = -n

    def token_piece(self, token: int, *, special: bool = False) -> bytes:
        """Bytes of one token (may be part of a UTF-8 character)."""
        if not 0 <= token < self.n_vocab:
            raise InvalidArgumentError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})",
                                       param="tokens")
        buf = self._piece_buf
        n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def token_text(self, token: int) -> str:
        return C.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace")

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> bytes:
        return b"".join(self.token_piece(t, special=special) for t in tokens)

    def close(self) -> None:
        if self._ptr is not None:
            C.llama_model_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:  # last resort; close() is the contract
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- batch

class Batch:
    """A reusable ``llama_batch`` of up to ``capacity`` tokens, each in up to
    ``n_seq_max`` sequences."""

    def __init__(self, capacity: int, n_seq_max: int = 1) -> None:
        self.capacity = capacity
        self.n_seq_max = n_seq_max
        self._b = C.llama_batch_init(capacity, 0, n_seq_max)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq_ids: int | Sequence[int], logits: bool) -> int:
        """Append a token; returns its index in the batch (for sampling)."""
        i = self.n
        if i >= self.capacity:
            raise RuntimeFailure("batch overflow")
        b = self._b
        b.token[i] = token
        b.pos[i] = pos
        if isinstance(seq_ids, int):
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq_ids
        else:
            b.n_seq_id[i] = len(seq_ids)
            for j, s in enumerate(seq_ids):
                b.seq_id[i][j] = s
        b.logits[i] = logits
        self.n = i + 1
        return i

    @property
    def raw(self):
        self._b.n_tokens = self.n
        return self._b

    def close(self) -> None:
        if self._b is not None:
            C.llama_batch_free(self._b)
            self._b = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


