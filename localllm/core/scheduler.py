"""Continuous batching: every running sequence is decoded together, a step at a time.

Requests join and leave the shared batch between steps. Each step decodes one
token of every generating sequence (and the tails beam search decodes again)
and some prompt tokens: with ``prefill="exact"`` at most one canonical chunk
while others generate (so a reused prefix is bit for bit a fresh one: see
:mod:`lanes`), with ``"fair"`` a smaller piece beside them; :mod:`prefill`
decides. After the decode, each request's unit samples its rows.

The scheduler has no thread of its own: :meth:`Scheduler.step` runs one step.
The server calls :meth:`start` for a decode thread; ``Model`` drives the same
steps in the caller's thread with :meth:`run`.

Example:
    >>> sched = Scheduler(llama_model, n_slots=4, n_ctx_seq=2048, n_threads=2)     # doctest: +SKIP
    >>> for ev in sched.run(Request(ids, SamplingParams(max_tokens=8))): ...     # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from localllm import runtime
from localllm.core import lanes as lanes_mod
from localllm.core import slot_cache
from localllm.core.beams import Beams
from localllm.core.lanes import Lane, Slot
from localllm.core.prefill import Prefill, parse as parse_prefill
from localllm.core.prompt_cache import PromptCache
from localllm.core.request import Event, Request
from localllm.core.sampled import Sampled
from localllm.errors import (ContextOverflowError, InvalidArgumentError, LocalLLMError, QueueFullError,
                             RuntimeFailure, ServiceUnavailableError)

log = logging.getLogger("localllm.core")


class Unit(Protocol):
    """What the scheduler runs for one request (:class:`Sampled` or :class:`Beams`)."""

    req: Request
    lanes: list[Lane]
    finished: bool

    def after_decode(self, ctx: runtime.Context, now: float, events: list[Event]) -> None: ...

    def close(self) -> None: ...


def _as_error(e: BaseException) -> LocalLLMError:
    if isinstance(e, LocalLLMError):
        return e
    if isinstance(e, KeyboardInterrupt):
        return ServiceUnavailableError("generation was interrupted")
    return RuntimeFailure(f"decoding failed: {type(e).__name__}: {e}")


class Scheduler:
    """Owns one llama.cpp context with ``n_slots`` KV streams of ``n_ctx_seq`` tokens."""

    def __init__(self, model: runtime.LlamaModel, *, n_slots: int, n_ctx_seq: int, n_threads: int,
                 max_queue: int = 16, n_batch: int = 512,
                 on_step: Callable[[dict[str, Any]], None] | None = None,
                 prompt_cache: PromptCache | None = None, speculate: str = "off", prefill: str = "exact",
                 **context: Any) -> None:
        self.model = model
        self.prompt_cache = prompt_cache  # KV states on disk (restored in _start, saved in _chunk_done)
        self.n_slots = n_slots
        self.n_ctx_seq = n_ctx_seq
        self.max_queue = max_queue
        # exact: one KV stream per slot (like llama-server -np N): a sequence's cells stay in position
        # order whatever the others do, so its attention sums round the same alone or batched.
        # fair: one unified stream, so a prompt's piece and the streams' tokens are one micro-batch
        # (over several streams llama.cpp splits sequences of different lengths apart: two passes)
        # ``context``: the KV cache types and flash attention (ModelSettings.context_options)
        # a chunk may share its llama_decode with the rows (Prefill.beside): room for a token of each beside it
        fair = parse_prefill(prefill)[0] == "fair"
        self.n_stream = 1 if fair else n_slots  # KV streams (part of the prompt cache's key)
        self.ctx = runtime.Context(model, n_ctx=n_ctx_seq * n_slots, n_threads=n_threads, n_batch=n_batch + n_slots,
                                   n_ubatch=n_batch, n_seq_max=n_slots, kv_unified=fair,
                                   **context)
        self.batch = runtime.Batch(self.ctx.n_batch, 1)
        self.unit = min(lanes_mod.CHUNK, n_batch)  # canonical chunk length (part of the cache key)
        self.prefill = Prefill(prefill, unit=self.unit, shared=context.get("flash_attn") is False)
        self.eog = frozenset(model.eog_tokens())
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Request] = deque()
        self.active: list[Unit] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.on_step = on_step
        self.stats = {"busy_slots": 0, "queue_depth": 0, "steps": 0, "last_step_sequences": 0,
                      "max_step_sequences": 0, "drafted_tokens": 0, "accepted_tokens": 0}
        self.thread: threading.Thread | None = None
        self._warm_up()
        self.speculate = speculate == "on"  # prompt lookup drafts for greedy answers (core/speculate.py)

    def _warm_up(self) -> None:
        """One small decode at load, so the first request does not pay for llama.cpp's
        first-use setup (graph allocation, weight repacking, a mapped file's page faults). Two
        tokens, as llama.cpp's own warm-up: a dense model's every weight is touched once whatever the
        count, and each further token only adds compute (7B, 2 cores: load 1.80 s with 8, 0.88 s with 2;
        docs/performance.md, "Load time")."""
        b = self.batch
        b.clear()
        n = min(2, b.capacity)
        for i in range(n):
            b.add(max(self.model.bos, 0), i, 0, i == n - 1)
        self.ctx.decode(b)
        self.ctx.clear()

    # ------------------------------------------------------------------ public
    def check(self, req: Request) -> None:
        """Refuse what this scheduler can never run (400s), before queueing."""
        p = req.params
        if p.width > self.n_slots:
            name = "num_beams" if p.num_beams > 1 else ("best_of" if p.best_of > p.n else "n")
            raise InvalidArgumentError(f"{name} is {p.width} but this model runs {self.n_slots} sequences at once "
                                       f"(start the server with a larger --parallel)", param=name)
        if not req.prompt:
            raise InvalidArgumentError("the prompt is empty", param="prompt")
        if len(req.prompt) >= self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt is {len(req.prompt)} tokens but the context holds {self.n_ctx_seq} per "
                f"sequence (and at least one token must be generated)",
                hint="shorten the prompt or raise the context (--ctx / n_ctx)", param="prompt",
                prompt_tokens=len(req.prompt), n_ctx=self.n_ctx_seq)
        n_vocab = self.model.n_vocab
        if any(not 0 <= t < n_vocab for t in req.prompt):
            raise InvalidArgumentError(f"prompt token ids must be in 0..{n_vocab - 1}", param="prompt")
        if p.logit_bias and any(t >= n_vocab for t in p.logit_bias):
            raise InvalidArgumentError(f"logit_bias token ids must be in 0..{n_vocab - 1}", param="logit_bias")
        text = p.grammar_text()  # a schema or grammar that cannot be used is the caller's 400, now,
        if text:                 # not an error inside a stream that already answered 200
            runtime.Grammar(self.model, text).close()

    def submit(self, req: Request) -> Request:
        """Queue ``req``; raises QueueFullError (503) when the wait queue is full."""
        self.check(req)
        with self.cv:
            if self.stopping:
                raise ServiceUnavailableError("the server is shutting down")
            # a request not yet moved into a free slot is not waiting for one: count free
            # slots as room too, or a burst into an idle server would get 503s
            free = sum(1 for slot in self.slots if not slot.busy)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFullError(f"all {self.n_slots} slots are busy and {len(self.waiting)} requests "
                                     f"are waiting", retry_after=1)
            self.waiting.append(req)
            self.stats["queue_depth"] = len(self.waiting)
            self.cv.notify()
        return req

    def run(self, req: Request) -> Iterator[Event]:
        """Submit ``req`` and drive the steps in this thread until it is done,
        yielding its events as they come (``Model``'s driver)."""
        if self.thread is not None:
            raise RuntimeFailure("this scheduler runs on its own thread; use submit()")
        self.submit(req)
        try:
            while not req.done:
                yield from req.drain()
                if req.done:
                    break
                if not self.step():
                    yield from req.drain()
                    if not req.done:
                        raise RuntimeFailure("the request ended without finishing")
        finally:
            if not req.done:
                req.cancel()
                self._reap()

    def start(self) -> None:
        """Decode on a thread of its own (the server)."""
        self.thread = threading.Thread(target=self._loop, name="localllm-scheduler", daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)
            if self.thread.is_alive():
                # still inside llama.cpp: freeing its context now would crash the process;
                # leaking it at exit is the lesser harm
                log.warning("the scheduler thread did not stop in 10 s; leaving its llama.cpp context allocated")
                return
        self._fail_all(ServiceUnavailableError("the server is shutting down"), waiting=True)
        if self.prompt_cache is not None:
            self.prompt_cache.flush()  # a state being written is whole on disk before the process may end
        self.batch.close()
        self.ctx.close()

    def forget(self) -> None:
        """Drop every slot's cached prefix (the next prompt is read from scratch). Idle schedulers only."""
        if self.active:
            raise RuntimeFailure("cannot forget the cache while requests are running")
        self._drop_caches()

    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        """Move waiting requests into free slots (FIFO; a wide request waits for enough slots).
        Slots are claimed under the lock; units are built after it (compiling a grammar may
        take a while, and ``submit`` must not wait for it)."""
        starting: list[tuple[Request, list[Slot]]] = []
        with self.cv:
            while self.waiting:
                req = self.waiting[0]
                if req.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                free = [s for s in self.slots if not s.busy]
                if len(free) < req.params.width:
                    break
                self.waiting.popleft()
                chosen = self._choose(req, free)
                for s in chosen:
                    s.busy = True
                starting.append((req, chosen))
            self.stats["queue_depth"] = len(self.waiting)
        for i, (req, chosen) in enumerate(starting):
            try:
                self._start(req, chosen)
            except BaseException:  # Ctrl-C while starting: the others go back to the front of the queue
                with self.cv:
                    for r, ch in reversed(starting[i + 1:]):
                        for sl in ch:
                            sl.busy = False
                        self.waiting.appendleft(r)
                raise

    def _choose(self, req: Request, free: list[Slot]) -> list[Slot]:
        """The lead: the slot sharing the longest prefix with the prompt. The others (n,
        best_of, beams) are overwritten: those holding the least of it, least recently used."""
        prompt = req.prompt
        shared = {s.seq: lanes_mod.lcp(s.cached, prompt) for s in free}
        lead = max(free, key=lambda s: (shared[s.seq], s.last_used))
        rest = sorted((s for s in free if s is not lead), key=lambda s: (shared[s.seq], s.last_used))
        return [lead] + rest[:req.params.width - 1]

    def _start(self, req: Request, chosen: list[Slot]) -> None:
        """Start ``req`` on its claimed slots. A failure (a grammar llama.cpp refuses) ends this
        request alone; an interrupt (Ctrl-C) goes on up. Either way the slots are given back."""
        try:
            self._start_unit(req, chosen)
        except BaseException as e:
            for sl in chosen:
                sl.busy = False
                sl.cached, sl.exact = [], 0  # a restore may be half done
                self.ctx.seq_rm(sl.seq, -1, -1)
            req.queue.put(Event("error", error=_as_error(e)))
            if not isinstance(e, Exception):
                raise

    def _start_unit(self, req: Request, chosen: list[Slot]) -> None:
        prompt = req.prompt
        lanes = [Lane(s) for s in chosen]
        prompt_cuts = lanes_mod.cuts(prompt, eog=self.eog, unit=self.unit)
        if req.cuts:
            prompt_cuts = sorted(set(prompt_cuts).union(req.cuts))
        if self.prompt_cache is not None and not req.cuts:
            slot_cache.restore(self.prompt_cache, self.ctx, chosen[0], prompt, prompt_cuts)
        req.cached_tokens = lanes_mod.start(self.ctx, lanes[0], prompt, prompt_cuts, req.cuts)
        for lane in lanes[1:]:
            lanes_mod.truncate(self.ctx, lane.slot, 0)
            lane.pos = 0
        unit: Unit
        if req.params.num_beams > 1:
            unit = Beams(req, lanes, self.model, n_ctx=self.n_ctx_seq)
        else:
            unit = Sampled(req, lanes, self.model, n_ctx=self.n_ctx_seq, speculate=self.speculate)
        req.t_start = time.perf_counter()
        self.active.append(unit)
        # rows in sequence-id order: with one KV stream per sequence llama.cpp splits a batch
        # into equal micro-batches over consecutive sequences; any other order costs extra splits
        self.active.sort(key=lambda u: u.lanes[0].slot.seq)
        self.stats["busy_slots"] = self.busy_slots()

    def _reap(self) -> None:
        """Free the slots of finished or cancelled requests."""
        keep = []
        now = time.monotonic()
        for u in self.active:
            if not u.finished and not u.req.cancelled.is_set():
                keep.append(u)
                continue
            u.close()
            if u.req.t_end is None:
                u.req.t_end = time.perf_counter()
            if isinstance(u, Sampled):
                self.stats["drafted_tokens"] += u.drafted
                self.stats["accepted_tokens"] += u.taken
            for lane in u.lanes:
                lane.slot.busy = False
                lane.slot.last_used = now
        if len(keep) != len(self.active):
            self.active = keep
            self.stats["busy_slots"] = self.busy_slots()

    def _fail_all(self, err: LocalLLMError, *, waiting: bool = False) -> None:
        """End every running (and with ``waiting``, queued) request with ``err``;
        forget every slot's cache, since a failed step may have left it half-written."""
        for u in self.active:
            u.req.queue.put(Event("error", error=err))
            u.req.cancel()
        if waiting:
            with self.cv:
                for req in self.waiting:
                    req.queue.put(Event("error", error=err))
                self.waiting.clear()
        self._reap()
        self._drop_caches()

    def _drop_caches(self) -> None:
        self.ctx.clear()
        for sl in self.slots:
            sl.cached, sl.exact, sl.extra = [], 0, ()

    # ------------------------------------------------------------------ the steps
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.active and not self.waiting:
                    self.cv.wait()
                if self.stopping:
                    break
            self.step()

    def step(self) -> bool:
        """Admit, decode once, sample. Returns False when there was nothing to do.
        A failure ends every running request with an error, never the process."""
        try:
            self._admit()
            self._reap()
            if not self.active:
                return False
            self._decode_step()
            self._reap()
            return True
        except Exception as e:
            log.exception("scheduler step failed")
            err = _as_error(e)
            self._fail_all(err)
            return True
        except BaseException as e:  # Ctrl-C in Model's thread: leave a consistent cache, then go
            self._fail_all(_as_error(e))
            raise

    def _decode_step(self) -> None:
        t0 = time.perf_counter()
        lanes = [lane for u in self.active for lane in u.lanes]
        for lane in lanes:
            lane.row = -1
            lane.rows = []
        fed, n_prompt, n_rows = self.prefill.step(self.ctx, self.batch, lanes, self._chunk_done, self._tail_done)
        if not fed:
            # only units waiting on work that is not theirs: cannot happen, but never spin
            for u in self.active:
                u.after_decode(self.ctx, time.perf_counter(), [])
            time.sleep(0.001)
            return
        now = time.perf_counter()
        for u in self.active:
            self._after(u, now)
        st = self.stats
        st["steps"] += 1
        st["last_step_sequences"] = len(fed)
        st["max_step_sequences"] = max(st["max_step_sequences"], len(fed))
        if self.on_step is not None:
            self.on_step({"seconds": now - t0, "sequences": len(fed), "tokens": n_rows + n_prompt,
                          "prompt_tokens": n_prompt})

    def _chunk_done(self, lane: Lane) -> None:
        """A canonical chunk is in: the slot is exact up to it, unless a piece went in before it;
        a prompt whose last chunk is in is saved to the prompt cache."""
        if not lane.ragged:
            lane.slot.exact = lane.pos
            if not lane.cuts and self.prompt_cache is not None:
                slot_cache.save(self.prompt_cache, self.ctx, lane.slot)

    def _tail_done(self, lane: Lane) -> None:
        """A prompt's tail was decoded alone: its request samples its first token now (the step's
        next decode overwrites the logits); the rows of the shared batch come after."""
        unit = next(u for u in self.active if lane in u.lanes)
        self._after(unit, time.perf_counter())
        for other in unit.lanes:
            other.row = -1
            other.rows = []

    def _after(self, unit: Unit, now: float) -> None:
        """Let ``unit`` sample what was just decoded, and pass its events on."""
        events: list[Event] = []
        unit.after_decode(self.ctx, now, events)
        if unit.finished and unit.req.t_end is None:
            unit.req.t_end = now
        for ev in events:
            unit.req.queue.put(ev)
