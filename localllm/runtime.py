"""The runtime adapter: the only module that imports ``llama_cpp``.

It owns llama.cpp's C objects (models, contexts, batches, samplers), frees
them, and turns llama.cpp failures into :mod:`localllm.errors` exceptions.
Everything above it speaks Python: token ids, bytes, numpy views.

The hot path (one decode + one sample per token) stays in C: sampling runs
through llama.cpp's sampler chain, so no per-token copy of the logits is made
in Python.

Example:
    >>> m = load_model("model.gguf")                     # doctest: +SKIP
    >>> ctx = Context(m, n_ctx=512)                      # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import llama_cpp as C
import numpy as np

from localllm import settings
from localllm.errors import (InsufficientMemoryError, InvalidArgumentError,
                             InvalidModelFileError, ModelLoadError, RuntimeFailure,
                             UnsupportedArchitectureError)

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
    return sink


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


def supports_gpu_offload() -> bool:
    _backend()
    return bool(C.llama_supports_gpu_offload())


def llama_cpp_version() -> str:
    return LLAMA_CPP_PYTHON_VERSION


@functools.cache
def _ggml_lib() -> ctypes.CDLL | None:
    """libggml from llama-cpp-python's wheel, for the backend-device API that
    llama-cpp-python does not bind."""
    libdir = Path(C.__file__).parent / "lib"
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
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


# --------------------------------------------------------------------------- model

class LlamaModel:
    """A loaded llama.cpp model (weights + vocabulary). Free with :meth:`close`.

    Loading is read-only and the weights are memory-mapped, so several
    contexts may share one model.
    """

    def __init__(self, path: str | os.PathLike[str], *, n_gpu_layers: int = 0,
                 vocab_only: bool = False, use_mmap: bool = True, use_extra_bufts: bool = True) -> None:
        sink = _backend()
        self.path = Path(path)
        params = C.llama_model_default_params()
        params.n_gpu_layers = int(n_gpu_layers)
        params.vocab_only = bool(vocab_only)
        params.use_mmap = bool(use_mmap)
        # False keeps weights unrepacked: slower on some CPUs, but the same kernel runs for 1 and n rows
        params.use_extra_bufts = bool(use_extra_bufts)
        mark = sink.mark()
        ptr = C.llama_model_load_from_file(os.fsencode(self.path), params)
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

    def chat_template(self) -> str | None:
        tmpl = C.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8", "replace") if tmpl else None

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


# --------------------------------------------------------------------------- context

# KV cache element types llama.cpp's CPU backend takes (ggml_type ids, ggml.h)
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "bf16": 30, "q8_0": 8, "q5_1": 7, "q5_0": 6, "q4_1": 3, "q4_0": 2,
                  "iq4_nl": 20}


class Context:
    """A llama.cpp context: KV cache + compute buffers for one model.

    ``n_seq_max`` > 1 partitions the KV cache by sequence id for batching.
    Not thread-safe: one thread drives a context.
    """

    def __init__(self, model: LlamaModel, *, n_ctx: int, n_threads: int, n_batch: int | None = None,
                 n_ubatch: int = 512, n_seq_max: int = 1, embeddings: bool = False,
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
        if embeddings:
            p.pooling_type = C.LLAMA_POOLING_TYPE_MEAN
        if flash_attn is not None:
            p.flash_attn_type = C.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else C.LLAMA_FLASH_ATTN_TYPE_DISABLED
        p.type_k = KV_CACHE_TYPES[cache_type_k]
        p.type_v = KV_CACHE_TYPES[cache_type_v]
        mark = sink.mark()
        ptr = C.llama_init_from_model(model.ptr, p)
        if not ptr:
            raise _explain_load_failure(model.path, sink.since(mark), sink.since(mark, _LOG_ERROR))
        self._ptr = ptr
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
        ptr = C.llama_get_logits_ith(self.ptr, i)
        if not ptr:
            raise RuntimeFailure(f"no logits for batch row {i}")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,))

    def embedding(self, seq_id: int) -> np.ndarray:
        ptr = C.llama_get_embeddings_seq(self.ptr, seq_id)
        if not ptr:
            raise RuntimeFailure("no pooled embedding for this sequence")
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_embd,)).copy()

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

    def close(self) -> None:
        if self._ptr is not None:
            C.llama_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# --------------------------------------------------------------------------- sampling

class Sampler:
    """llama.cpp's sampler chain: logit bias → penalties → grammar → top-k →
    top-p → min-p → temperature → dist, or greedy at temperature 0. Sampling
    happens in C on the context's logits (no per-token copy to Python).

    ``repeat_penalty``, ``presence_penalty`` and ``frequency_penalty`` are
    llama.cpp's penalty sampler over the last ``repeat_last_n`` tokens;
    :meth:`prime` feeds it the prompt so that the prompt counts too.
    """

    def __init__(self, model: LlamaModel, *, temperature: float = 0.8, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                 repeat_last_n: int = 64, seed: int | None = None, grammar: str | None = None,
                 logit_bias: dict[int, float] | None = None) -> None:
        _backend()
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self._ptr = chain
        self.argmax_only = False
        self._keep: list = []
        self._penalties = None
        self._last_n = repeat_last_n
        try:
            if logit_bias:
                arr = (C.llama_logit_bias * len(logit_bias))()
                for j, (tok, bias) in enumerate(logit_bias.items()):
                    arr[j].token, arr[j].bias = int(tok), float(bias)
                self._keep.append(arr)
                self._add(C.llama_sampler_init_logit_bias(model.n_vocab, len(logit_bias), arr))
            penalized = repeat_last_n > 0 and (repeat_penalty != 1.0 or presence_penalty != 0.0
                                               or frequency_penalty != 0.0)
            if penalized:
                self._penalties = C.llama_sampler_init_penalties(model.n_vocab, repeat_last_n, repeat_penalty,
                                                                 frequency_penalty, presence_penalty)
                self._add(self._penalties)
            if grammar:
                g = C.llama_sampler_init_grammar(model._vocab, grammar.encode("utf-8"), b"root")
                if not g:
                    raise InvalidArgumentError("the grammar does not parse", param="grammar")
                self._add(g)
            # plain greedy needs no chain state: argmax over the zero-copy logits
            # view is 5-10x cheaper than llama.cpp building a candidates array
            # of the whole vocabulary every token (300 us at a 262k vocab)
            self.argmax_only = temperature <= 0.0 and not penalized and not grammar
            self._bias, self._biased = self._argmax_bias(model, logit_bias) if self.argmax_only else (None, None)
            if temperature <= 0.0:
                self._add(C.llama_sampler_init_greedy())
            else:
                if top_k > 0:
                    self._add(C.llama_sampler_init_top_k(top_k))
                if top_p < 1.0:
                    self._add(C.llama_sampler_init_top_p(top_p, 1))
                if min_p > 0.0:
                    self._add(C.llama_sampler_init_min_p(min_p, 1))
                self._add(C.llama_sampler_init_temp(temperature))
                s = C.LLAMA_DEFAULT_SEED if seed is None else (seed & 0xFFFFFFFF)
                self._add(C.llama_sampler_init_dist(s))
        except BaseException:
            self.close()
            raise

    def _argmax_bias(self, model: LlamaModel, logit_bias: dict[int, float] | None
                     ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Greedy with a logit bias (ignore_eos bans the end tokens with -inf): the same float32
        additions llama.cpp's logit_bias sampler makes, on a preallocated buffer, then argmax
        (first maximum, like the greedy sampler); 10x cheaper than the C chain per token."""
        if not logit_bias:
            return None, None
        if not all(0 <= int(t) < model.n_vocab for t in logit_bias):
            self.argmax_only = False  # llama.cpp's sampler ignores such ids; let it
            return None, None
        bias = np.zeros(model.n_vocab, dtype=np.float32)
        for tok, b in logit_bias.items():
            bias[int(tok)] += np.float32(b)
        return bias, np.empty(model.n_vocab, dtype=np.float32)

    def _add(self, s) -> None:
        C.llama_sampler_chain_add(self._ptr, s)  # the chain owns s from here

    def prime(self, tokens: Sequence[int]) -> None:
        """Count ``tokens`` (the prompt) in the penalty window; the grammar does not see them."""
        if self._penalties is not None:
            for t in tokens[-self._last_n:]:
                C.llama_sampler_accept(self._penalties, int(t))

    def sample(self, ctx: Context, i: int = -1) -> int:
        """Sample from batch row ``i``'s logits and accept the token."""
        if self.argmax_only:
            if self._bias is None:
                return int(ctx.logits(i).argmax())
            np.add(ctx.logits(i), self._bias, out=self._biased)
            return int(self._biased.argmax())
        return int(C.llama_sampler_sample(self._ptr, ctx.ptr, i))

    def close(self) -> None:
        if self._ptr is not None:
            C.llama_sampler_free(self._ptr)
            self._ptr = None
            self._penalties = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


# llama_token_data as numpy sees it: the whole vocabulary is checked without a Python loop
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class Grammar:
    """One GBNF grammar's parse state, for callers that rank tokens themselves
    (beam search): which tokens it allows next, accept one, clone the state.

    Example:
        >>> g = Grammar(model, 'root ::= "yes" | "no"')      # doctest: +SKIP
        >>> g.allowed(np.array([yes_id, eos_id]))              # doctest: +SKIP
        array([ True, False])
    """

    def __init__(self, model: LlamaModel, text: str | None = None, *, _ptr=None) -> None:
        _backend()
        self.model = model
        if _ptr is None:
            _ptr = C.llama_sampler_init_grammar(model._vocab, (text or "").encode("utf-8"), b"root")
            if not _ptr:
                raise InvalidArgumentError("the grammar does not parse", param="grammar")
        self._ptr = _ptr

    def allowed(self, tokens: np.ndarray) -> np.ndarray:
        """A bool mask over ``tokens``: which ones the grammar accepts next
        (an end-of-generation token only where the grammar is complete)."""
        arr = np.zeros(len(tokens), dtype=_TOKEN_DATA)
        arr["id"] = tokens
        tda = C.llama_token_data_array(data=arr.ctypes.data_as(ctypes.POINTER(C.llama_token_data)),
                                       size=len(tokens), selected=-1, sorted=False)
        C.llama_sampler_apply(self._ptr, ctypes.byref(tda))
        return np.isfinite(arr["logit"])

    def accept(self, token: int) -> None:
        """Advance past ``token``, which must be allowed (llama.cpp aborts otherwise)."""
        C.llama_sampler_accept(self._ptr, int(token))

    def clone(self) -> Grammar:
        return Grammar(self.model, _ptr=C.llama_sampler_clone(self._ptr))

    def close(self) -> None:
        if self._ptr is not None:
            C.llama_sampler_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


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


def log_tail(n: int = 20) -> list[str]:
    """The last lines llama.cpp logged (for diagnostics)."""
    sink = _backend()
    with sink.lock:
        return [line for _, line in list(sink.lines)[-n:]]


def time_us() -> int:
    return int(C.llama_time_us())


# --------------------------------------------------------------------------- grammars

def json_schema_to_grammar(schema: dict | bool) -> str:
    """A GBNF grammar that accepts exactly the JSON documents matching ``schema``
    (llama-cpp-python's converter).

    Example:
        >>> "root" in json_schema_to_grammar({"type": "object"})
        True
    """
    import json

    from llama_cpp import llama_grammar

    try:
        return llama_grammar.json_schema_to_gbnf(json.dumps(schema))
    except Exception as e:  # the converter raises bare Exceptions/KeyErrors on bad schemas
        raise InvalidArgumentError(f"the JSON schema cannot be turned into a grammar: {e}",
                                   param="response_format") from None


def json_grammar() -> str:
    """A GBNF grammar for any JSON value (``response_format: json_object``)."""
    from llama_cpp import llama_grammar

    return llama_grammar.JSON_GBNF
