"""``Model``: the Python API over one GGUF model.

Example:
    >>> from localllm import Model
    >>> with Model() as m:                                 # the default model
    ...     print(m.generate("The capital of France is", max_tokens=8, temperature=0))
    ...                                                    # doctest: +SKIP
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from localllm import chat as chatmod
from localllm import settings
from localllm.errors import (ContextOverflowError, InvalidArgumentError, ModelBusyError,
                             ModelClosedError)
from localllm.textstream import TextStream

GpuLayers = int | Literal["auto", "all"]


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is."""

    path: str
    name: str
    arch: str
    parameters: int
    quant: str
    size_bytes: int
    context_train: int
    context: int
    n_layer: int
    n_embd: int
    n_vocab: int
    has_chat_template: bool
    gpu_layers: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One finished generation: the text, why it stopped, and its timings."""

    text: str
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    time_to_first_token_s: float = 0.0
    prompt_tokens_per_s: float = 0.0
    generation_tokens_per_s: float = 0.0
    total_s: float = 0.0
    tokens: list[int] = field(default_factory=list, repr=False)

    def timings(self) -> dict[str, float | int]:
        d = asdict(self)
        d.pop("text")
        d.pop("tokens")
        return d


class _Stream(Iterator[str]):
    """The iterator ``stream``/``chat_stream`` return. The Model's lock is taken
    when the call is made; a generator that is never started never runs its
    ``finally``, so closing or dropping an unstarted stream releases it here."""

    def __init__(self, gen: Iterator[str], lock: threading.Lock) -> None:
        self._gen, self._lock, self._started = gen, lock, False

    def __next__(self) -> str:
        self._started = True
        return next(self._gen)

    def close(self) -> None:
        if not self._started:
            self._started = True  # release once
            self._lock.release()
        self._gen.close()  # type: ignore[attr-defined]

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def _check_sampling(max_tokens: int | None, temperature: float, top_p: float, top_k: int,
                    min_p: float, repeat_penalty: float, stop: str | Sequence[str] | None) -> list[str]:
    def bad(param: str, msg: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{param} {msg}", param=param)

    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise bad("max_tokens", "must be a positive integer")
    for name, v in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p),
                    ("repeat_penalty", repeat_penalty)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise bad(name, "must be a finite number")
    if temperature < 0:
        raise bad("temperature", "must be >= 0")
    if not 0 < top_p <= 1:
        raise bad("top_p", "must be in (0, 1]")
    if not 0 <= min_p <= 1:
        raise bad("min_p", "must be in [0, 1]")
    if repeat_penalty <= 0:
        raise bad("repeat_penalty", "must be > 0")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise bad("top_k", "must be an integer >= 0")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) for s in stops) or len(stops) > 16:
        raise bad("stop", "must be a string or a list of at most 16 strings")
    return [s for s in stops if s]


class Model:
    """A GGUF model loaded with llama.cpp, with one context (KV cache).

    ``model`` is a path to a ``.gguf`` file, a store name (``NAME`` or
    ``NAME:VERSION``), or ``None`` for the default model.

    Thread safety: a ``Model`` is **not** thread-safe. It drives one llama.cpp
    context; a second thread calling it while a generation runs gets
    :class:`~localllm.errors.ModelBusyError` instead of corrupted state. Use
    one ``Model`` per thread, or ``localllm serve`` (which batches many
    requests through one context).

    Successive calls reuse the KV cache for the longest common token prefix,
    so the next turn of a chat does not re-read the history.

    Example:
        >>> with Model("smollm2-135m", n_ctx=2048, seed=1) as m:      # doctest: +SKIP
        ...     m.chat([{"role": "user", "content": "Hi!"}], max_tokens=20)
    """

    def __init__(self, model: str | Path | None = None, *, n_ctx: int | None = None,
                 n_threads: int | None = None, n_gpu_layers: GpuLayers = "auto",
                 seed: int | None = None, models_dir: str | Path | None = None) -> None:
        from localllm import placement, runtime, store, validate  # runtime loads llama.cpp: import late

        self._rt = runtime
        self._lock = threading.Lock()
        self._closed = False
        self._ctx = self._emb = self._m = None
        self._beam_ctx = None
        path = store.resolve(model, models_dir=models_dir)
        header = validate.read_header(path)  # llama.cpp never sees a file that fails this bounded check
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 16):
            raise InvalidArgumentError("n_ctx must be an integer >= 16", param="n_ctx")
        if n_threads is None:
            n_threads = settings.default_threads()
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise InvalidArgumentError("n_threads must be a positive integer", param="n_threads")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidArgumentError("seed must be an integer", param="seed")
        gpu_layers, self.placement_reason = placement.explain(path, n_gpu_layers, n_ctx)
        # on a GPU build that runs out of memory, retry with fewer layers and say so (a warning)
        self._m, gpu_layers, notes = placement.load_with_fallback(
            lambda n: runtime.LlamaModel(path, n_gpu_layers=n), gpu_layers,
            n_layer=int(header.get("block_count", 0)) if gpu_layers else None)
        for note in notes:
            import warnings

            warnings.warn(note, RuntimeWarning, stacklevel=2)
            self.placement_reason = note
        from localllm.plan import context_size

        n_ctx = context_size(n_ctx, self._m.n_ctx_train)
        self._ctx = runtime.Context(self._m, n_ctx=n_ctx, n_threads=n_threads)
        self._batch = runtime.Batch(self._ctx.n_batch)
        self._cached: list[int] = []  # tokens whose KV is in sequence 0
        self.n_threads = n_threads
        self.seed = seed
        self.path = path
        meta = self._m.meta()
        self._meta = meta
        from localllm.prompting import Prompter

        self._prompter = Prompter(self._m, header.metadata)
        self.template_source = self._prompter.template_source
        self.tokenizer_source = self._prompter.tokenizer_source
        self.info = ModelInfo(
            path=str(path), name=meta.get("general.name", path.stem), arch=meta.get("general.architecture", "?"),
            parameters=self._m.n_params, quant=header.quant,
            size_bytes=self._m.size, context_train=self._m.n_ctx_train, context=self._ctx.n_ctx,
            n_layer=self._m.n_layer, n_embd=self._m.n_embd, n_vocab=self._m.n_vocab,
            has_chat_template=self.template_source == "gguf", gpu_layers=gpu_layers)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Free the llama.cpp objects. Safe to call twice."""
        self._closed = True
        for obj in (getattr(self, "_batch", None), self._emb, self._beam_ctx, self._ctx, self._m):
            if obj is not None:
                obj.close()
        self._ctx = self._emb = self._beam_ctx = None

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _enter(self) -> None:
        if self._closed:
            raise ModelClosedError("this Model was closed")
        if not self._lock.acquire(blocking=False):
            raise ModelBusyError("this Model is already generating (a Model is not thread-safe)",
                                 hint="use one Model per thread, or finish/close the running stream")

    # ------------------------------------------------------------------ tokens
    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = False) -> list[int]:
        """Text → token ids. ``special=True`` parses special-token text like ``<|im_end|>``.

        Example:
            >>> m.tokenize("Hello", add_bos=False)             # doctest: +SKIP
            [19556]
        """
        if not isinstance(text, str):
            raise InvalidArgumentError("text must be a string", param="text")
        self._check_open()
        return self._prompter.tokenize(text, add_special=add_bos and self._m.add_bos, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids → text.

        Example:
            >>> m.detokenize(m.tokenize("Hello", add_bos=False))   # doctest: +SKIP
            'Hello'
        """
        self._check_open()
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidArgumentError("ids must be integers", param="ids")
        return self._m.detokenize(list(ids)).decode("utf-8", "replace")

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this Model was closed")

    # ------------------------------------------------------------------ generation core
    def _tokens_stream(self, prompt: list[int], *, max_tokens: int | None, temperature: float,
                       top_p: float, top_k: int, min_p: float, repeat_penalty: float,
                       seed: int | None, grammar: str | None, result: Completion) -> Iterator[bytes]:
        """Decode ``prompt`` (reusing the cached prefix) and yield each new token's bytes.

        The caller holds the lock. Fills ``result`` as it goes.
        """
        rt, ctx, m = self._rt, self._ctx, self._m
        n_ctx = ctx.n_ctx
        if len(prompt) >= n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(prompt)} tokens but the context holds {n_ctx} "
                f"(and at least one token must be generated)",
                hint="shorten the prompt or raise the context (--ctx / n_ctx)",
                prompt_tokens=len(prompt), n_ctx=n_ctx)
        t0 = time.perf_counter()
        # longest common prefix with what is already in the KV cache; always
        # re-decode at least the last prompt token to get fresh logits
        keep = 0
        for a, b in zip(self._cached, prompt[:-1]):
            if a != b:
                break
            keep += 1
        if keep < len(self._cached) and not ctx.seq_rm(0, keep, -1):
            keep = 0  # this cache type cannot drop a suffix (e.g. sliding window): start over
            ctx.clear()
        if keep == 0:
            ctx.clear()
        self._cached = prompt[:keep]
        batch = self._batch
        pos = keep
        todo = prompt[keep:]
        for start in range(0, len(todo), batch.capacity):
            chunk = todo[start:start + batch.capacity]
            batch.clear()
            for j, tok in enumerate(chunk):
                batch.add(tok, pos + j, 0, start + j == len(todo) - 1)
            try:
                ctx.decode(batch)
            except BaseException:
                self._cached = []
                ctx.clear()
                raise
            pos += len(chunk)
            self._cached.extend(chunk)
        result.prompt_tokens = len(prompt)
        result.cached_tokens = keep
        sampler = rt.Sampler(m, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty, seed=self.seed if seed is None else seed,
                             grammar=grammar)
        t_first = None
        n_gen = 0
        try:
            limit = max_tokens if max_tokens is not None else n_ctx
            result.finish_reason = "length"
            # prompt + completion never exceed the context: the last token sampled is at n_ctx - 1
            while n_gen < limit and pos < n_ctx:
                tok = sampler.sample(ctx, -1)
                if t_first is None:
                    t_first = time.perf_counter()
                if m.is_eog(tok):
                    result.finish_reason = "stop"
                    break
                n_gen += 1
                result.tokens.append(tok)
                result.completion_tokens = n_gen
                if pos + 1 >= n_ctx:  # the context is full: no need to decode this last token
                    yield m.token_piece(tok)
                    break
                batch.clear()
                batch.add(tok, pos, 0, True)
                # yield before decoding so the consumer sees the token as early as possible;
                # decode happens when the consumer asks for the next one
                yield m.token_piece(tok)
                ctx.decode(batch)
                self._cached.append(tok)
                pos += 1
        finally:
            sampler.close()
            t_end = time.perf_counter()
            t_first = t_first or t_end
            result.time_to_first_token_s = t_first - t0
            n_prompt_decoded = len(prompt) - keep
            result.prompt_tokens_per_s = n_prompt_decoded / max(t_first - t0, 1e-9)
            result.generation_tokens_per_s = (max(n_gen - 1, 0) / (t_end - t_first)) if t_end > t_first else 0.0
            result.total_s = t_end - t0

    def _run(self, prompt: list[int], *, stop: list[str], result: Completion, **kw: Any) -> Iterator[str]:
        """Text stream over _tokens_stream with stop strings; holds the lock."""
        gen = self._tokens_stream(prompt, result=result, **kw)
        text = TextStream(stop)
        try:
            for piece in gen:
                out = text.feed(piece)
                if out:
                    yield out
                if text.stopped:
                    result.finish_reason = "stop"
                    break
            tail = text.flush()
            if tail:
                yield tail
        finally:
            gen.close()  # runs the token loop's cleanup (sampler, timings) now
            result.text = text.text
            self._lock.release()

    def _prepare(self, prompt_ids: list[int], max_tokens: int | None, temperature: float, top_p: float,
                 top_k: int, min_p: float, repeat_penalty: float, stop: Any, seed: int | None,
                 grammar: str | None) -> tuple[Completion, Iterator[str]]:
        stops = _check_sampling(max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, stop)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidArgumentError("seed must be an integer", param="seed")
        result = Completion(text="", finish_reason="length", prompt_tokens=len(prompt_ids), completion_tokens=0)
        it = self._run(prompt_ids, stop=stops, result=result, max_tokens=max_tokens, temperature=temperature,
                       top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty, seed=seed,
                       grammar=grammar)
        return result, it

    def _prompt_ids(self, prompt: str) -> list[int]:
        return self._prompter.text_ids(prompt)

    def _chat_ids(self, messages: Any, system: str | None = None) -> list[int]:
        msgs = chatmod.normalize_messages(messages)
        if system is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": system}, *msgs]
        return self._prompter.chat_ids(msgs)

    def render_chat(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        self._check_open()
        return self._prompter.render(messages, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ public generation API
    def complete(self, prompt: str, *, max_tokens: int | None = 256, temperature: float = 0.8,
                 top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None,
                 grammar: str | None = None) -> Completion:
        """Like :meth:`generate`, returning a :class:`Completion` with finish reason and timings.

        Example:
            >>> m.complete("1, 2, 3,", max_tokens=5, temperature=0).finish_reason   # doctest: +SKIP
            'length'
        """
        self._enter()
        try:
            ids = self._prompt_ids(prompt)
            result, it = self._prepare(ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                       stop, seed, grammar)
        except BaseException:
            self._lock.release()
            raise
        for _ in it:
            pass
        return result

    def generate(self, prompt: str, max_tokens: int | None = 256, temperature: float = 0.8,
                 top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                 stop: str | Sequence[str] | None = None, seed: int | None = None,
                 num_beams: int | None = None) -> str:
        """Continue ``prompt`` (raw text, no chat template) and return the new text.

        ``temperature=0`` is greedy, hence reproducible. ``max_tokens=None``
        runs until end-of-sequence or the context is full.

        Example:
            >>> m.generate("Once upon a time", max_tokens=16, temperature=0)   # doctest: +SKIP
        """
        if num_beams is not None:
            return self.beam_search(prompt, num_beams=num_beams, max_tokens=max_tokens, stop=stop)
        return self.complete(prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                             min_p=min_p, repeat_penalty=repeat_penalty, stop=stop, seed=seed).text

    MAX_BEAMS = 8

    def beam_search(self, prompt: str, *, num_beams: int = 4, max_tokens: int | None = 256,
                    stop: str | Sequence[str] | None = None) -> str:
        """The most likely continuation found by beam search (``generate(..., num_beams=K)``).

        ``num_beams=1`` is greedy decoding. Sampling parameters do not apply.

        Example:
            >>> m.generate("The capital of France is", max_tokens=8, num_beams=4)   # doctest: +SKIP
        """
        from localllm.beam import beam_search

        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or not 1 <= num_beams <= self.MAX_BEAMS:
            raise InvalidArgumentError(f"num_beams must be an integer in 1..{self.MAX_BEAMS}", param="num_beams")
        stops = _check_sampling(max_tokens, 0.0, 1.0, 0, 0.0, 1.0, stop)
        self._enter()
        try:
            ids = self._prompt_ids(prompt)
            n_ctx = self._ctx.n_ctx
            if len(ids) >= n_ctx:
                raise ContextOverflowError(f"the prompt is {len(ids)} tokens but the context holds {n_ctx}",
                                           prompt_tokens=len(ids), n_ctx=n_ctx)
            if self._beam_ctx is None:  # K beams + K scratch sequences sharing one unified KV cache
                self._beam_ctx = self._rt.Context(self._m, n_ctx=n_ctx, n_threads=self.n_threads,
                                                  n_seq_max=2 * self.MAX_BEAMS)
            ctx = self._beam_ctx
            ctx.clear()
            toks, _ = beam_search(ctx, self._m, ids, num_beams=num_beams,
                                  max_tokens=max_tokens if max_tokens is not None else n_ctx)
            text = TextStream(stops)
            out = text.feed(self._m.detokenize(toks))
            return out + text.flush()
        finally:
            self._lock.release()

    def stream(self, prompt: str, max_tokens: int | None = 256, temperature: float = 0.8,
               top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
               stop: str | Sequence[str] | None = None, seed: int | None = None) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are produced.

        Example:
            >>> for piece in m.stream("Hi", max_tokens=8):          # doctest: +SKIP
            ...     print(piece, end="")
        """
        self._enter()
        try:
            ids = self._prompt_ids(prompt)
            self.last, it = self._prepare(ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                          stop, seed, None)
        except BaseException:
            self._lock.release()
            raise
        return _Stream(it, self._lock)

    def chat_complete(self, messages: Sequence[dict[str, Any]], *, system: str | None = None,
                      max_tokens: int | None = 512, temperature: float = 0.8, top_p: float = 0.95,
                      top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
                      stop: str | Sequence[str] | None = None, seed: int | None = None,
                      grammar: str | None = None) -> Completion:
        """Like :meth:`chat`, returning a :class:`Completion`."""
        self._enter()
        try:
            ids = self._chat_ids(messages, system)
            result, it = self._prepare(ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                       stop, seed, grammar)
        except BaseException:
            self._lock.release()
            raise
        for _ in it:
            pass
        return result

    def chat(self, messages: Sequence[dict[str, Any]], max_tokens: int | None = 512, temperature: float = 0.8,
             top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05, repeat_penalty: float = 1.0,
             stop: str | Sequence[str] | None = None, seed: int | None = None, *,
             system: str | None = None) -> str:
        """Answer a conversation (OpenAI-style ``messages``) using the model's own chat template.

        Example:
            >>> m.chat([{"role": "user", "content": "Say hi"}], max_tokens=10)   # doctest: +SKIP
        """
        return self.chat_complete(messages, system=system, max_tokens=max_tokens, temperature=temperature,
                                  top_p=top_p, top_k=top_k, min_p=min_p, repeat_penalty=repeat_penalty,
                                  stop=stop, seed=seed).text

    def chat_stream(self, messages: Sequence[dict[str, Any]], max_tokens: int | None = 512,
                    temperature: float = 0.8, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                    repeat_penalty: float = 1.0, stop: str | Sequence[str] | None = None,
                    seed: int | None = None, *, system: str | None = None) -> Iterator[str]:
        """Like :meth:`chat`, yielding text pieces. ``model.last`` holds the timings afterwards."""
        self._enter()
        try:
            ids = self._chat_ids(messages, system)
            self.last, it = self._prepare(ids, max_tokens, temperature, top_p, top_k, min_p, repeat_penalty,
                                          stop, seed, None)
        except BaseException:
            self._lock.release()
            raise
        return _Stream(it, self._lock)

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """L2-normalised mean-pooled embeddings, one per text.

        Example:
            >>> len(m.embed(["hello", "world"]))                  # doctest: +SKIP
            2
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts or not all(isinstance(t, str) for t in texts):
            raise InvalidArgumentError("texts must be a string or a non-empty list of strings", param="input")
        self._enter()
        try:
            if self._emb is None:
                from localllm.embeddings import Embedder

                self._emb = Embedder(self._m, self._prompter, n_ctx=self._ctx.n_ctx, n_threads=self.n_threads)
            return self._emb.embed(texts)[0]
        finally:
            self._lock.release()

    def __repr__(self) -> str:
        return f"Model({self.info.name!r}, arch={self.info.arch}, quant={self.info.quant}, n_ctx={self.info.context})"

