"""``Model``: the Python door to the generation core.

Everything here is a thin layer over :class:`localllm.core.engine.Engine`:
the same loader, sampling parameters, scheduler, prefix reuse and beam
search the server runs, driven in the caller's thread.

Example:
    >>> from localllm import Model
    >>> with Model() as m:                                 # the default model
    ...     print(m.generate("The capital of France is", max_tokens=8, temperature=0))
    ...                                                    # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localllm import tools as toolsmod
from localllm.core.logprobs import TokenLogprob
from localllm.core.request import Choice, Request, collect
from localllm.errors import InvalidArgumentError, ModelBusyError, ModelClosedError
from localllm.loader import GpuLayers, ModelInfo, ModelSettings
from localllm.sampling import MAX_BEAMS, SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from localllm.sampling import SamplingKwargs

__all__ = ["Model", "ModelInfo", "Completion", "Choice", "TokenLogprob", "GpuLayers", "Reasoning"]


class Reasoning(str):
    """A piece of a reasoning model's thinking, as ``chat_stream(..., reasoning=True)`` yields it
    among the answer's own (plain ``str``) pieces.

    Example:
        >>> isinstance(Reasoning("hmm"), str), isinstance("answer", Reasoning)
        (True, False)
    """


@dataclass
class Completion:
    """One finished generation: the text (of the first choice), why it stopped,
    its timings, and every choice (``n`` > 1). ``reasoning``: a reasoning model's thinking
    (never in ``text``)."""

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
    logprobs: list[TokenLogprob] | None = field(default=None, repr=False)
    choices: list[Choice] = field(default_factory=list, repr=False)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # with tools: the calls (OpenAI shape)
    tool_call_error: str | None = None   # with tools: why an answer that looked like a call is not one
    reasoning: str = ""                  # a reasoning model's thinking (first choice)

    def timings(self) -> dict[str, float | int]:
        d = asdict(self)
        for k in ("text", "tokens", "logprobs", "choices", "finish_reason", "tool_calls", "tool_call_error",
                  "reasoning"):
            d.pop(k)
        return d


def _completion(req: Request, choices: list[Choice]) -> Completion:
    first = choices[0]
    t_end = req.t_end or time.perf_counter()
    t_first = req.t_first or t_end
    t_start = req.t_start or req.t_submit
    return Completion(
        text=first.text, finish_reason=first.finish_reason or "length", prompt_tokens=len(req.prompt),
        completion_tokens=req.completion_tokens, cached_tokens=req.cached_tokens,
        time_to_first_token_s=t_first - req.t_submit,
        prompt_tokens_per_s=(len(req.prompt) - req.cached_tokens) / max(t_first - t_start, 1e-9),
        generation_tokens_per_s=(max(len(first.tokens) - 1, 0) / (t_end - t_first)) if t_end > t_first else 0.0,
        total_s=t_end - req.t_submit, tokens=first.tokens, logprobs=first.logprobs, choices=choices,
        reasoning=first.reasoning)


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


class Model:
    """A GGUF model loaded with llama.cpp.

    ``model`` is a path to a ``.gguf`` file, a store name (``NAME`` or
    ``NAME:VERSION``), or ``None`` for the default model. ``n_ctx`` is the
    context of each sequence; ``seed`` is the default sampling seed.

    Generation methods take the fields of :class:`~localllm.sampling.SamplingParams`
    as keywords: ``temperature``, ``top_p``, ``top_k``, ``min_p``,
    ``repeat_penalty``, ``presence_penalty``, ``frequency_penalty``, ``seed``,
    ``stop``, ``grammar``, ``json_schema``, ``logit_bias``, ``ignore_eos``,
    ``n``, ``best_of``, ``num_beams``, ``logprobs``, ``top_logprobs``, ``reasoning_budget``
    (a reasoning model's thinking, in tokens; 0 turns thinking off).

    Thread safety: a ``Model`` is **not** thread-safe. A second thread calling
    it while a generation runs gets :class:`~localllm.errors.ModelBusyError`
    instead of corrupted state. ``localllm serve`` batches many clients.

    Successive calls reuse the KV cache for the longest common token prefix,
    so the next turn of a chat does not re-read the history. ``prompt_cache``
    (on by default; ``False`` turns it off, a folder moves it) keeps those KV
    states on disk too, so a new process starts with them
    (``Completion.cached_tokens`` counts the tokens not decoded again).
    ``speculate="on"``: greedy answers draft tokens from the prompt and verify
    them in one batch (faster when the answer copies its input; a batch's rows
    round differently, so a greedy near-tie may break the other way).
    ``prefill``: ``"exact"`` (default), ``"fair"`` or ``"fair:K"``, how a long
    prompt shares the decode steps with answers already streaming (a server's
    concern; K: a step beside the prompt takes about K times a streams-only
    step, 2 for ``fair``; see docs/serve.md, "Fairness").
    ``mmap``: ``True`` maps the weights from the file (shared with other
    processes), ``False`` reads them into memory backed by huge pages (decode
    3-16 % faster); the default reads where the kernel has transparent huge
    pages and the model fits in RAM (``Model.info.mmap`` says which).

    Example:
        >>> with Model("smollm2-135m", n_ctx=2048, seed=1) as m:      # doctest: +SKIP
        ...     m.chat([{"role": "user", "content": "Hi!"}], max_tokens=20)
    """

    MAX_BEAMS = MAX_BEAMS

    def __init__(self, model: str | Path | None = None, *, n_ctx: int | None = None,
                 n_threads: int | None = None, n_gpu_layers: GpuLayers = "auto", gpu_memory: int | str | None = None,
                 seed: int | None = None, models_dir: str | Path | None = None, repack: bool = True,
                 prompt_cache: bool | str | Path | None = None, speculate: str | None = None,
                 prefill: str | None = None, mmap: bool | None = None, settings: ModelSettings | None = None) -> None:
        from localllm import loader, resolve
        from localllm.core.engine import Engine  # loads llama.cpp: import late

        self._lock = threading.Lock()
        self._closed = True
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidArgumentError("seed must be an integer", param="seed")
        if settings is None:
            settings = ModelSettings(model=model, n_ctx=n_ctx, n_threads=n_threads,
                                     n_gpu_layers=n_gpu_layers, gpu_memory=gpu_memory, repack=repack, mmap=mmap)
        if prompt_cache is not None and not isinstance(prompt_cache, (bool, str, os.PathLike)):
            raise InvalidArgumentError("prompt_cache must be true, false or a folder", param="prompt_cache")
        if prompt_cache is not None:  # a folder turns it on there
            on = prompt_cache if isinstance(prompt_cache, bool) else True
            folder = None if isinstance(prompt_cache, bool) else prompt_cache
            settings = dataclasses.replace(settings, prompt_cache=on,
                                           prompt_cache_dir=folder or settings.prompt_cache_dir)
        if speculate is not None:
            settings = dataclasses.replace(settings, speculate=speculate)
        if prefill is not None:
            settings = dataclasses.replace(settings, prefill=prefill)
        notes: list[str] = []  # the door resolves the name once; everything below takes the path
        settings = dataclasses.replace(settings, model=resolve.resolve(settings.model, models_dir=models_dir,
                                                                       notes=notes))
        self._engine = Engine(settings, prepared=loader.prepare(settings, notes))
        self._closed = False
        for note in self._engine.notes:  # the library never prints: a warning the caller may show
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        self.seed = seed
        self.info: ModelInfo = self._engine.info
        self.path = Path(self.info.path)
        self.placement_reason = self.info.placement
        self.template_source = self.info.template_source
        self.tokenizer_source = self.info.tokenizer_source
        self.n_threads = self.info.threads
        self.last: Completion | None = None

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Free the llama.cpp objects. Safe to call twice."""
        if not self._closed:
            self._closed = True
            self._engine.close()

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

    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosedError("this Model was closed")

    def reset(self) -> None:
        """Forget the cached prompt prefix: the next call reads its prompt from scratch
        (for measuring, or to free the KV cache's contents)."""
        self._enter()
        try:
            self._engine.forget()
        finally:
            self._lock.release()

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
        return self._engine.tokenize(text, add_special=add_bos, parse_special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Token ids → text.

        Example:
            >>> m.detokenize(m.tokenize("Hello", add_bos=False))   # doctest: +SKIP
            'Hello'
        """
        self._check_open()
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidArgumentError("ids must be integers", param="ids")
        return self._engine.detokenize(list(ids), special=False)

    def count_tokens(self, messages: Sequence[dict[str, Any]], *, system: str | None = None) -> int:
        """How many prompt tokens a chat is, exactly as ``chat`` (and the server) will read it.

        Example:
            >>> m.count_tokens([{"role": "user", "content": "Hi"}])     # doctest: +SKIP
            9
        """
        return len(self.chat_tokens(messages, system=system))

    def chat_tokens(self, messages: Sequence[dict[str, Any]], *, system: str | None = None) -> list[int]:
        """The prompt's token ids for a chat, exactly as ``chat`` (and the server) will read it.

        Example:
            >>> m.chat_tokens([{"role": "user", "content": "Hi"}])[:2]   # doctest: +SKIP
            [1, 9690]
        """
        self._check_open()
        return self._engine.chat_ids(messages, system)

    def render_chat(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of ``messages``."""
        self._check_open()
        return self._engine.render_chat(messages, add_generation_prompt=add_generation_prompt)

    @property
    def engine(self) -> Any:
        """The generation core under this Model (:class:`localllm.core.engine.Engine`), for benchmarks
        and advanced use: what it exposes publicly is the same scheduler the server runs."""
        self._check_open()
        return self._engine

    # ------------------------------------------------------------------ the one path
    def _params(self, sampling: dict[str, Any], default_max: int) -> SamplingParams:
        sampling.setdefault("max_tokens", default_max)
        if sampling.get("seed") is None and self.seed is not None:
            sampling["seed"] = self.seed
        unknown = set(sampling) - set(SamplingParams.names())
        if unknown:
            raise InvalidArgumentError(f"unknown sampling option(s): {', '.join(sorted(unknown))}",
                                       param=sorted(unknown)[0])
        return SamplingParams(**sampling)

    def _start(self, prompt: Any, chat: bool, system: str | None, sampling: dict[str, Any],
               default_max: int, tools: toolsmod.ToolSpec | None = None) -> Request:
        """Validate and tokenize; the caller holds the lock."""
        params = toolsmod.with_grammar(self._params(sampling, default_max), tools, self._engine.tool_family)
        if chat:
            return self._engine.chat_request(prompt, params, system=system, tools=tools)
        return Request(self._engine.text_ids(prompt), params)

    def _complete(self, prompt: Any, chat: bool, system: str | None, sampling: dict[str, Any],
                  default_max: int, tools: toolsmod.ToolSpec | None = None) -> Completion:
        self._enter()
        try:
            req = self._start(prompt, chat, system, sampling, default_max, tools)
            choices = collect(self._engine.run(req), req.params.n)
            self.last = _completion(req, choices)
            if tools is not None and tools.active:
                p = toolsmod.parse(self.last.text, tools, self._engine.tool_family)
                self.last.text, self.last.tool_calls, self.last.tool_call_error = p.content or "", p.calls, p.error
                if p.calls:
                    self.last.finish_reason = "tool_calls"
            return self.last
        finally:
            self._lock.release()

    def _stream(self, prompt: Any, chat: bool, system: str | None, sampling: dict[str, Any],
                default_max: int, reasoning: bool = False) -> Iterator[str]:
        self._enter()
        try:
            req = self._start(prompt, chat, system, sampling, default_max)
            if req.params.n > 1:
                raise InvalidArgumentError("a stream has one choice: use complete(..., n=N) for several",
                                           param="n")
            self.last = _completion(req, [Choice(0)])
        except BaseException:
            self._lock.release()
            raise
        return _Stream(self._pieces(req, reasoning), self._lock)

    def _pieces(self, req: Request, reasoning: bool) -> Iterator[str]:
        choice = Choice(0)
        try:
            for ev in self._engine.run(req):
                if ev.kind == "reasoning":
                    choice.reasoning += ev.text
                    if reasoning and ev.text:
                        yield Reasoning(ev.text)
                elif ev.kind == "text":
                    choice.text += ev.text
                    if ev.logprobs is not None:
                        choice.logprobs = (choice.logprobs or []) + ev.logprobs
                    if ev.text:
                        yield ev.text
                elif ev.kind == "done":
                    choice.finish_reason, choice.tokens = ev.finish_reason, ev.tokens
        finally:
            self.last = _completion(req, [choice])
            self._lock.release()

    # ------------------------------------------------------------------ public generation API
    def complete(self, prompt: str | Sequence[int], **sampling: Unpack[SamplingKwargs]) -> Completion:
        """Continue ``prompt`` (raw text or token ids; no chat template): a
        :class:`Completion` with the text, finish reason, timings and choices.

        Example:
            >>> m.complete("1, 2, 3,", max_tokens=5, temperature=0).finish_reason   # doctest: +SKIP
            'length'
        """
        return self._complete(prompt, False, None, dict(sampling), 256)

    def generate(self, prompt: str | Sequence[int], **sampling: Unpack[SamplingKwargs]) -> str:
        """Continue ``prompt`` and return the new text (the first choice).

        ``temperature=0`` is greedy, hence reproducible. ``max_tokens=None``
        runs until end-of-sequence or the context is full. ``num_beams=K`` is
        beam search.

        Example:
            >>> m.generate("Once upon a time", max_tokens=16, temperature=0)   # doctest: +SKIP
        """
        return self.complete(prompt, **sampling).text

    def beam_search(self, prompt: str, *, num_beams: int = 4, **sampling: Unpack[SamplingKwargs]) -> str:
        """The most likely continuation found by beam search (``generate(..., num_beams=K)``)."""
        return self.generate(prompt, num_beams=num_beams, **sampling)

    def stream(self, prompt: str | Sequence[int], **sampling: Unpack[SamplingKwargs]) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are produced;
        ``model.last`` holds the :class:`Completion` afterwards.

        Example:
            >>> for piece in m.stream("Hi", max_tokens=8):          # doctest: +SKIP
            ...     print(piece, end="")
        """
        return self._stream(prompt, False, None, dict(sampling), 256)

    def chat_complete(self, messages: Sequence[dict[str, Any]], *, system: str | None = None,
                      tools: Sequence[dict[str, Any]] | None = None, tool_choice: Any = None,
                      parallel_tool_calls: bool | None = None, **sampling: Unpack[SamplingKwargs]) -> Completion:
        """Like :meth:`chat`, returning a :class:`Completion`. ``tools``/``tool_choice``/``parallel_tool_calls``
        as in OpenAI's API: calls come back in ``Completion.tool_calls`` (``text`` holds any other content,
        or the whole answer with ``tool_call_error`` when it was not a valid call)."""
        spec = toolsmod.spec_from(tools, tool_choice, parallel_tool_calls)
        return self._complete(messages, True, system, dict(sampling), 512, spec)

    def chat(self, messages: Sequence[dict[str, Any]], *, system: str | None = None,
             **sampling: Unpack[SamplingKwargs]) -> str:
        """Answer a conversation (OpenAI-style ``messages``) using the model's own chat template.

        Example:
            >>> m.chat([{"role": "user", "content": "Say hi"}], max_tokens=10)   # doctest: +SKIP
        """
        return self.chat_complete(messages, system=system, **sampling).text

    def chat_stream(self, messages: Sequence[dict[str, Any]], *, system: str | None = None,
                    reasoning: bool = False, **sampling: Unpack[SamplingKwargs]) -> Iterator[str]:
        """Like :meth:`chat`, yielding text pieces. ``model.last`` holds the timings (and a reasoning
        model's thinking, ``last.reasoning``) afterwards. ``reasoning=True``: the thinking is
        yielded too, as it comes, in :class:`Reasoning` pieces (a ``str`` subclass)."""
        return self._stream(messages, True, system, dict(sampling), 512, reasoning)

    # ------------------------------------------------------------------ code completion
    def infill_tokens(self, prefix: str, suffix: str, *, extra: Sequence[dict[str, str]] | None = None,
                      prompt: str = "", max_tokens: int | None = 256, spm: bool = False) -> list[int]:
        """The fill-in-the-middle prompt :meth:`infill` reads, as token ids (llama-server's ``/infill``
        layout with this model's FIM tokens; see :mod:`localllm.core.fim`)."""
        self._check_open()
        return self._engine.infill_ids(prefix, suffix, prompt=prompt, extra=extra, max_tokens=max_tokens, spm=spm)

    def infill(self, prefix: str, suffix: str, *, extra: Sequence[dict[str, str]] | None = None,
               prompt: str = "", spm: bool = False, **sampling: Unpack[SamplingKwargs]) -> str:
        """Code completion: the text that goes between ``prefix`` and ``suffix``, written with the
        model's FIM tokens (a coder model: Qwen2.5-Coder, CodeLlama, StarCoder2, ...; another one
        raises InvalidArgumentError). ``extra``: other files (``[{"filename", "text"}]``);
        ``prompt``: text the answer starts with; ``spm``: suffix-prefix-middle order.
        ``model.last`` holds the :class:`Completion`.

        Example:
            >>> m.infill("def add(a, b): return ", " # the sum", max_tokens=8, temperature=0)  # doctest: +SKIP
            'a + b'
        """
        ids = self.infill_tokens(prefix, suffix, extra=extra, prompt=prompt,
                                 max_tokens=sampling.get("max_tokens", 256), spm=spm)
        return self._complete(ids, False, None, dict(sampling), 256).text

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
            return self._engine.embed(list(texts))[0]
        finally:
            self._lock.release()

    def rerank(self, query: str, documents: str | Sequence[str], *, top_n: int | None = None) -> list[tuple[int, float]]:
        """``(index, relevance score)`` of each document, best first (at most ``top_n``), with a
        reranker GGUF (bge-reranker, Qwen3-Reranker, ...; another model raises InvalidArgumentError).

        Example:
            >>> m.rerank("what is a cat?", ["a cat is an animal", "rust is a language"])   # doctest: +SKIP
            [(0, 3.1), (1, -7.9)]
        """
        from localllm.rerank import ranked

        if isinstance(documents, str):
            documents = [documents]
        if not isinstance(query, str):
            raise InvalidArgumentError("query must be a string", param="query")
        if not isinstance(documents, Sequence) or not documents or not all(isinstance(d, str) for d in documents):
            raise InvalidArgumentError("documents must be a string or a non-empty list of strings", param="documents")
        if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
            raise InvalidArgumentError("top_n must be a positive integer", param="top_n")
        self._enter()
        try:
            scores = self._engine.rerank(query, list(documents))[0]
        finally:
            self._lock.release()
        return [(i, scores[i]) for i in ranked(scores, top_n)]

    def __repr__(self) -> str:
        return f"Model({self.info.name!r}, arch={self.info.arch}, quant={self.info.quant}, n_ctx={self.info.context})"
