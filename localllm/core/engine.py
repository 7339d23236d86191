"""A loaded model with its scheduler, prompts and embeddings: what ``Model``
and the server both run on.

Example:
    >>> eng = Engine(ModelSettings(model="smollm2-135m", n_ctx=1024))        # doctest: +SKIP
    >>> req = Request(eng.text_ids("1, 2, 3,"), SamplingParams(temperature=0, max_tokens=4))  # doctest: +SKIP
    >>> collect(eng.run(req), 1)[0].text                                      # doctest: +SKIP
    ' 4, 5'
"""

from __future__ import annotations


import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm import chat as chatmod
from localllm import loader
from localllm import tools as toolsmod
from localllm.core import fim as fimmod
from localllm.core import reasoning
from localllm.core.prompt_cache import open_cache
from localllm.core.request import Event, Request
from localllm.core.scheduler import Scheduler
from localllm.errors import InvalidArgumentError
from localllm.loader import ModelInfo, ModelSettings
from localllm.sampling import SamplingParams
from localllm.tools import ToolSpec


@dataclass(frozen=True)
class EngineStatus:
    """What an engine is doing right now: one snapshot, read for ``/health`` and the metrics gauges.

    Example:
        >>> s = EngineStatus(queue_depth=0, busy_slots=1, n_slots=4)
        >>> s.idle_slots, s.idle
        (3, False)
    """

    queue_depth: int    # requests waiting for a slot
    busy_slots: int     # slots generating
    n_slots: int        # sequences decoded at once (--parallel)

    @property
    def idle_slots(self) -> int:
        return self.n_slots - self.busy_slots

    @property
    def idle(self) -> bool:
        """Nothing running and nothing waiting (the server's pool may unload it)."""
        return self.busy_slots == 0 and self.queue_depth == 0


class Engine:
    """Loads ``settings.model`` (see :func:`localllm.loader.load`) and owns its scheduler.

    ``threaded=True`` (the server) decodes on a thread of its own and takes
    requests from any thread with :meth:`submit`; otherwise the caller drives
    the steps with :meth:`run` (``Model``).
    """

    def __init__(self, settings: ModelSettings, *, threaded: bool = False, max_queue: int = 16,
                 on_step: Callable[[dict[str, Any]], None] | None = None,
                 prepared: loader.Prepared | None = None) -> None:
        self.settings = settings
        self.loaded = loader.load(settings, prepared=prepared)
        self.llama = self.loaded.llama
        self.prompter = self.loaded.prompter
        self.info: ModelInfo = self.loaded.info
        self.notes = self.loaded.notes
        self._threaded, self._max_queue, self._on_step = threaded, max_queue, on_step
        self._emb_lock = threading.Lock()
        self._embedder: Any = None
        self._reranker: Any = None
        try:
            self.scheduler = self._scheduler(settings.n_seq)
        except BaseException:
            self.loaded.close()
            raise

    def _scheduler(self, n_slots: int) -> Scheduler:
        st = self.settings
        s = Scheduler(self.llama, n_slots=n_slots, n_ctx_seq=self.info.context, n_threads=self.info.threads,
                      max_queue=self._max_queue, on_step=self._on_step, speculate=st.speculate,
                      prefill=st.prefill,
                      **st.context_options())
        if st.prompt_cache:  # keyed by the scheduler's chunk length too, so opened after it
            s.prompt_cache = open_cache(st.prompt_cache_root(), self.loaded.path, n_stream=s.n_stream,
                                        chunk=s.unit, context=st.context_options(),
                                        max_bytes=st.prompt_cache_bytes)
        if self._threaded:
            s.start()
        return s

    # ------------------------------------------------------------------ prompts
    def text_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """A raw prompt (no template) as token ids; a list of ids is taken as it is."""
        if isinstance(prompt, str):
            return self.prompter.text_ids(prompt)
        if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                             for t in prompt):
            return list(prompt)  # ids outside the vocabulary: the scheduler's check refuses them
        raise InvalidArgumentError("prompt must be a string or a non-empty list of token ids", param="prompt")

    def chat_ids(self, messages: Any, system: str | None = None, tools: ToolSpec | None = None,
                 template_vars: Mapping[str, Any] | None = None) -> list[int]:
        """OpenAI-style messages → token ids through the model's own template (sandboxed),
        with ``tools`` rendered as the template's family expects (:mod:`localllm.tools`) and
        ``template_vars`` (``enable_thinking``, ...) passed to the template."""
        msgs = chatmod.normalize_messages(messages)
        if system is not None:
            if not isinstance(system, str):
                raise InvalidArgumentError("system must be a string", param="system")
            if not (msgs and msgs[0]["role"] == "system"):
                msgs = [{"role": "system", "content": system}, *msgs]
        toolsmod.check_messages(msgs)
        msgs, extra = toolsmod.render_inputs(msgs, tools, self.tool_family)
        return self.prompter.chat_ids(msgs, **{**(template_vars or {}), **extra})

    def chat_request(self, messages: Any, params: SamplingParams, *, system: str | None = None,
                     tools: ToolSpec | None = None, stream: bool = True,
                     template_kwargs: Mapping[str, Any] | None = None) -> Request:
        """A chat as a :class:`Request`. For a reasoning model (markers in its template, see
        :mod:`localllm.core.reasoning`) thinking is switched off in the template where
        ``params.reasoning_budget`` is 0 and the template can, and the request carries the markers:
        its events part reasoning from text and the scheduler enforces the budget.
        ``template_kwargs``: a request's own template variables (``chat_template_kwargs``)."""
        template = self.prompter.template
        tv = reasoning.template_vars(template, params.reasoning_budget, template_kwargs)
        ids = self.chat_ids(messages, system, tools, template_vars=tv)
        return Request(ids, params, stream=stream, thinking=self.thinking(ids))

    def thinking(self, prompt: Sequence[int]) -> reasoning.Thinking | None:
        """How an answer to the chat prompt ``prompt`` carries reasoning (None: the model has no markers)."""
        markers = reasoning.detect(self.prompter.template)
        if markers is None:
            return None
        tail = self.detokenize(list(prompt[-32:]))
        close_ids = self.tokenize(markers.forced, add_special=False, parse_special=True)
        return reasoning.Thinking(markers, inside=reasoning.starts_inside(tail, markers), close_ids=tuple(close_ids))

    @property
    def tool_family(self) -> str:
        """The call syntax of this model's chat template (hermes, llama3, mistral or generic)."""
        return toolsmod.family_of(self.prompter.template)

    def infill_ids(self, prefix: str, suffix: str, *, prompt: str = "", extra: Any = None,
                   max_tokens: int | None = None, spm: bool = False) -> list[int]:
        """A fill-in-the-middle prompt (code completion) with this model's FIM tokens, cut to its
        context as llama-server cuts it (:mod:`localllm.core.fim`); ``extra``: other files of the
        project (``[{"filename", "text"}]``). A model without FIM tokens: InvalidArgumentError."""
        return fimmod.infill_ids(self.prompter, prefix, suffix, prompt=prompt, extra=fimmod.extra_files(extra),
                                 n_ctx=self.info.context, max_tokens=max_tokens, spm=spm)

    @property
    def has_fim(self) -> bool:
        """Whether the vocabulary has the prefix, suffix and middle tokens code completion needs."""
        return "insert" in self.info.capabilities

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Text → ids with the model's own tokenizer (the embedded HF one when present).
        ``add_special`` adds BOS as the GGUF says; ``parse_special`` reads ``<|im_end|>``-like text
        as one special token."""
        if not isinstance(text, str):
            raise InvalidArgumentError("content must be a string", param="content")
        return self.prompter.tokenize(text, add_special=add_special and self.llama.add_bos, special=parse_special)

    def detokenize(self, ids: Sequence[int], *, special: bool = True) -> str:
        """Ids → text (``special``: special tokens written out)."""
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)) or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidArgumentError("tokens must be a list of token ids", param="tokens")
        return self.llama.detokenize(list(ids), special=special).decode("utf-8", "replace")

    def piece(self, token: int) -> str:
        return self.llama.token_piece(token, special=True).decode("utf-8", "replace")

    def render_chat(self, messages: Any, *, add_generation_prompt: bool = True) -> str:
        return self.prompter.render(messages, add_generation_prompt=add_generation_prompt)

    # ------------------------------------------------------------------ generation
    def submit(self, req: Request) -> Request:
        """Queue ``req`` on the decode thread (threaded engines)."""
        return self.scheduler.submit(req)

    def run(self, req: Request) -> Iterator[Event]:
        """Generate ``req`` in this thread, yielding its events. A request wider than
        the scheduler (``n``, ``best_of``, ``num_beams``) gets a scheduler with more
        slots first; the model's weights are shared, only the KV cache grows."""
        width = req.params.width  # at most MAX_N or MAX_BEAMS: SamplingParams checked it
        if width > self.scheduler.n_slots and not self._threaded:
            old = self.scheduler.n_slots
            self.scheduler.close()  # first: the two KV caches need not fit at once
            try:
                self.scheduler = self._scheduler(width)
            except BaseException:
                self.scheduler = self._scheduler(old)  # what worked before; the error is the caller's
                raise
        return self.scheduler.run(req)

    # ------------------------------------------------------------------ state
    def status(self) -> EngineStatus:
        """Queue depth and slots now. Cheap, and safe from any thread."""
        s = self.scheduler
        return EngineStatus(queue_depth=int(s.stats.get("queue_depth", 0)), busy_slots=s.busy_slots(),
                            n_slots=s.n_slots)

    @property
    def stats(self) -> dict[str, int]:
        """A copy of the scheduler's counters: ``steps``, ``max_step_sequences``,
        ``drafted_tokens`` and ``accepted_tokens`` (``speculate``), ... Since the scheduler
        was made (a request wider than it makes a new one, see :meth:`run`)."""
        return dict(self.scheduler.stats)

    @property
    def hugepage_bytes(self) -> int:
        """Bytes of the model's own memory (weights read into memory, repacked buffers) the load
        asked the kernel to back with huge pages; 0 where THP is off (runtime/_hugepages.py)."""
        return self.llama.hugepage_bytes

    def forget(self) -> None:
        """Drop every slot's reusable prefix: the next prompt is read from scratch.
        Only while nothing runs (else :class:`~localllm.errors.RuntimeFailure`)."""
        self.scheduler.forget()

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings and the token count. Runs in the
        caller's thread on a context of its own (the weights are shared, read-only)."""
        with self._emb_lock:
            if self._embedder is None:
                from localllm.embeddings import Embedder

                self._embedder = Embedder(self.llama, self.prompter, n_ctx=min(self.info.context, 2048),
                                          n_threads=self.info.threads)
            return self._embedder.embed(texts)

    def rerank(self, query: str, documents: list[str]) -> tuple[list[float], int]:
        """Each document's relevance to ``query`` (a reranker GGUF's scores, :mod:`localllm.rerank`)
        and the token count; another model: InvalidArgumentError. In the caller's thread, on a
        context of its own."""
        with self._emb_lock:
            if self._reranker is None:
                from localllm.rerank import Reranker

                self._reranker = Reranker(self.llama, self.prompter, n_ctx=min(self.info.context, 2048),
                                          n_threads=self.info.threads)
            return self._reranker.scores(query, documents)

    def close(self) -> None:
        self.scheduler.close()
        with self._emb_lock:
            for helper in (self._embedder, self._reranker):
                if helper is not None:
                    helper.close()
            self._embedder = self._reranker = None
        self.loaded.close()
