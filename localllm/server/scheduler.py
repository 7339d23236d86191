"""Continuous batching: one thread owns the llama.cpp context and decodes every
running sequence together, one token each per step.

Requests join and leave the shared batch between decode steps. The KV cache is
partitioned by sequence id: slot ``i`` owns sequence ``i`` and keeps its
tokens after a request ends, so the next request whose prompt shares a prefix
(the next turn of a chat) only decodes the new part. ``n``/``best_of`` share
the prompt's KV cells through ``seq_cp`` instead of re-reading the prompt.

Example:
    >>> sched = Scheduler(model, n_slots=4, n_ctx_seq=2048, n_threads=2)   # doctest: +SKIP
    >>> job = sched.submit(Job(prompt=ids, params=GenParams(max_tokens=8)))  # doctest: +SKIP
    >>> for ev in job.events(): ...                                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from localllm import runtime
from localllm.errors import (ContextOverflowError, InvalidArgumentError, LocalLLMError, QueueFullError,
                             RuntimeFailure, ServiceUnavailableError)
from localllm.textstream import TextStream

log = logging.getLogger("localllm.server")
MAX_BEAMS = 8


@dataclass
class GenParams:
    """Sampling and stopping for one request (already validated)."""

    max_tokens: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    grammar: str | None = None
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    n: int = 1
    best_of: int = 1
    num_beams: int = 1


@dataclass
class Event:
    """What a job reports: ``kind`` is "text", "done" (one choice finished) or "error"."""

    kind: str
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    error: LocalLLMError | None = None


class Job:
    """One request: a prompt and its parameters; events come back on a queue."""

    def __init__(self, prompt: list[int], params: GenParams, stream: bool = True) -> None:
        self.prompt = prompt
        self.params = params
        # a non-streaming job gets its text in one event at the end: waking the HTTP
        # thread for every token would fight the decode thread for the GIL
        self.stream = stream
        self.queue: queue.Queue[Event] = queue.Queue()
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.seqs: list[Any] = []  # the scheduler's sequences for this job

    def cancel(self) -> None:
        """Stop generating (client went away); the slot is freed at the next step."""
        self.cancelled.set()

    def events(self, timeout: float | None = None,
               disconnected: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Yield events until every choice is done. ``disconnected`` is polled while waiting."""
        remaining = self.params.n
        while remaining:
            try:
                ev = self.queue.get(timeout=0.25)
            except queue.Empty:
                if disconnected is not None and disconnected():
                    self.cancel()
                    return
                continue
            if ev.kind == "error":
                assert ev.error is not None
                raise ev.error
            if ev.kind == "done":
                remaining -= 1
            yield ev


def _as_error(e: Exception) -> LocalLLMError:
    return e if isinstance(e, LocalLLMError) else RuntimeFailure(f"decoding failed: {type(e).__name__}: {e}")


class _Slot:
    """A KV partition: sequence ``seq`` and the tokens whose KV it holds."""

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []
        self.last_used = 0.0
        self.busy = False


class _Seq:
    """One choice being generated in a slot."""

    def __init__(self, job: Job, index: int, slot: _Slot, model: runtime.LlamaModel) -> None:
        p = job.params
        self.job, self.index, self.slot = job, index, slot
        bias = {int(t): -math.inf for t in np.flatnonzero(model._eog)} if p.ignore_eos else None
        seed = None if p.seed is None else p.seed + index
        self.sampler = runtime.Sampler(model, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                                       min_p=p.min_p, repeat_penalty=p.repeat_penalty, seed=seed,
                                       grammar=p.grammar, logit_bias=bias)
        self.text = TextStream(p.stop)
        self.pending: list[int] = []      # prompt tokens still to decode
        self.next_token: int | None = None  # sampled, to be decoded next step
        self.pos = 0
        self.row = -1                     # batch row holding this seq's logits after decode
        self.n_gen = 0
        self.logprob = 0.0
        self.out: list[str] = []          # buffered text when best_of > n
        self.finish: str | None = None
        self.leader: _Seq | None = None   # for n>1 followers: copy the leader's prompt KV


class Scheduler:
    """Owns the context; ``submit`` from any thread, decoding on one worker thread."""

    def __init__(self, model: runtime.LlamaModel, *, n_slots: int, n_ctx_seq: int, n_threads: int,
                 max_queue: int = 16, n_batch: int = 512, kv_unified: bool = False,
                 on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.model = model
        self.n_slots = n_slots
        self.n_ctx_seq = n_ctx_seq
        self.max_queue = max_queue
        # one KV stream per slot (like llama-server -np N): a sequence's cells stay in position
        # order whatever the others do, so its attention sums round the same alone or batched
        # (a unified cache interleaves cells and measurably changes greedy output)
        self.ctx = runtime.Context(model, n_ctx=n_ctx_seq * n_slots, n_threads=n_threads, n_batch=n_batch,
                                   n_ubatch=n_batch, n_seq_max=n_slots, kv_unified=kv_unified)
        self.n_threads = n_threads
        self._beam_ctx: runtime.Context | None = None
        self.batch = runtime.Batch(self.ctx.n_batch, 1)
        self._warm_up()
        self.slots = [_Slot(i) for i in range(n_slots)]
        self.waiting: deque[Job] = deque()
        self.active: list[_Seq] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.on_step = on_step
        self.stats = {"busy_slots": 0, "queue_depth": 0, "steps": 0}
        self.thread = threading.Thread(target=self._loop, name="localllm-scheduler", daemon=True)
        self.thread.start()

    def _warm_up(self) -> None:
        """One small decode at load, so the first request does not pay for llama.cpp's
        first-use setup (graph allocation, weight repacking)."""
        b = self.batch
        b.clear()
        for i in range(min(8, b.capacity)):
            b.add(max(self.model.bos, 0), i, 0, i == 7)
        self.ctx.decode(b)
        self.ctx.clear()

    # ------------------------------------------------------------------ public
    def submit(self, job: Job) -> Job:
        """Queue ``job``; raises QueueFullError (503) when the wait queue is full."""
        p = job.params
        width = max(p.best_of, p.n)
        if width > self.n_slots:
            raise InvalidArgumentError(f"n/best_of is {width} but this server runs {self.n_slots} sequences "
                                       f"at once (--parallel)", param="best_of" if p.best_of > p.n else "n")
        if len(job.prompt) >= self.n_ctx_seq:
            raise ContextOverflowError(
                f"the prompt is {len(job.prompt)} tokens but the context holds {self.n_ctx_seq} per "
                f"sequence (and at least one token must be generated)",
                hint="shorten the prompt or start the server with a larger --ctx", param="messages",
                prompt_tokens=len(job.prompt), n_ctx=self.n_ctx_seq)
        if not job.prompt:
            raise InvalidArgumentError("the prompt is empty", param="prompt")
        with self.cv:
            if self.stopping:
                raise ServiceUnavailableError("the server is shutting down")
            # a job not yet moved into a free slot is not waiting for one: count free
            # slots as room too, or a burst into an idle server would get 503s
            free = sum(1 for slot in self.slots if not slot.busy)
            if len(self.waiting) >= self.max_queue + free:
                raise QueueFullError(f"all {self.n_slots} slots are busy and {len(self.waiting)} requests "
                                     f"are waiting", retry_after=1)
            self.waiting.append(job)
            self.stats["queue_depth"] = len(self.waiting)
            self.cv.notify()
        return job

    def close(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            # still inside llama.cpp: freeing its context now would crash the process;
            # leaking it at exit is the lesser harm
            log.warning("the scheduler thread did not stop in 10 s; leaving its llama.cpp context allocated")
            return
        self.batch.close()
        if self._beam_ctx is not None:
            self._beam_ctx.close()
        self.ctx.close()

    def busy_slots(self) -> int:
        return sum(s.busy for s in self.slots)

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        """Move waiting jobs into free slots (FIFO; a wide job waits for enough slots)."""
        with self.cv:
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled.is_set():
                    self.waiting.popleft()
                    continue
                if job.params.num_beams > 1:
                    self.waiting.popleft()
                    self.cv.release()  # submit() must not block behind a long beam search
                    try:
                        self._beam(job)
                    finally:
                        self.cv.acquire()
                    continue
                free = [s for s in self.slots if not s.busy]
                width = max(job.params.best_of, job.params.n)
                if len(free) < width:
                    break
                self.waiting.popleft()
                self._start(job, free, width)
            self.stats["queue_depth"] = len(self.waiting)

    def _beam(self, job: Job) -> None:
        """Run a beam-search job to the end on this thread. It pauses the other
        sequences for its duration (beams reorder KV every step); see docs/serve.md."""
        from localllm.beam import beam_search

        p = job.params
        try:
            if self._beam_ctx is None:  # its own unified cache: beams share cells, K scratch ids reorder them
                self._beam_ctx = runtime.Context(self.model, n_ctx=self.n_ctx_seq, n_threads=self.n_threads,
                                                 n_seq_max=2 * MAX_BEAMS, kv_unified=True)
            self._beam_ctx.clear()
            limit = min(p.max_tokens or self.n_ctx_seq, self.n_ctx_seq - len(job.prompt))
            toks, reason = beam_search(self._beam_ctx, self.model, job.prompt, num_beams=p.num_beams,
                                       max_tokens=limit, n_ctx=self.n_ctx_seq,
                                       should_stop=lambda: self.stopping or job.cancelled.is_set())
        except Exception as e:  # whatever happens, this job gets an answer and the loop lives on
            job.queue.put(Event("error", error=_as_error(e)))
            return
        job.t_first = time.perf_counter()
        job.completion_tokens = len(toks)
        text = TextStream(p.stop)
        out = text.feed(self.model.detokenize(toks))
        out += text.flush()
        if text.stopped:
            reason = "stop"
        job.queue.put(Event("text", 0, out))
        job.queue.put(Event("done", 0, finish_reason=reason, tokens=len(toks)))

    def _start(self, job: Job, free: list[_Slot], width: int) -> None:
        prompt = job.prompt

        def lcp(s: _Slot) -> int:
            n = 0
            for a, b in zip(s.cached, prompt[:-1]):  # always re-decode the last prompt token
                if a != b:
                    break
                n += 1
            return n

        free.sort(key=lambda s: (lcp(s), -s.last_used), reverse=True)
        chosen = free[:width]
        try:
            seqs = [_Seq(job, i, s, self.model) for i, s in enumerate(chosen)]
        except Exception as e:
            job.queue.put(Event("error", error=_as_error(e)))
            return
        lead = seqs[0]
        keep = lcp(lead.slot)
        if keep < len(lead.slot.cached) and not self.ctx.seq_rm(lead.slot.seq, keep, -1):
            keep = 0  # this cache cannot drop a suffix: start the sequence over
        if keep == 0:
            self.ctx.seq_rm(lead.slot.seq, -1, -1)
        lead.slot.cached = prompt[:keep]
        lead.pending = prompt[keep:]
        lead.pos = keep
        job.cached_tokens = keep
        for s in seqs[1:]:
            self.ctx.seq_rm(s.slot.seq, -1, -1)
            s.slot.cached = []
            s.leader = lead
        job.seqs = seqs
        for s in seqs:
            s.slot.busy = True
        self.active.extend(seqs)
        # batch rows in sequence-id order: with one KV stream per sequence llama.cpp splits a
        # batch into equal micro-batches over consecutive sequences; any other order costs extra splits
        self.active.sort(key=lambda x: x.slot.seq)
        self.stats["busy_slots"] = self.busy_slots()

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            with self.cv:
                while not self.stopping and not self.active and not self.waiting:
                    self.cv.wait()
                if self.stopping:
                    break
            try:
                self._admit()
                self._reap()
                if not self.active:
                    continue
                self._step()
            except Exception as e:  # a failure ends every running request, not the server
                log.exception("scheduler step failed")
                err = _as_error(e)
                for s in list(self.active):
                    s.job.queue.put(Event("error", error=err))
                    s.job.cancel()
                self.ctx.clear()
                for sl in self.slots:
                    sl.cached = []
                self._reap()
        for s in self.active:
            s.job.queue.put(Event("error", error=ServiceUnavailableError("the server is shutting down")))
        self.active = []

    def _reap(self) -> None:
        """Free the slots of finished or cancelled sequences."""
        keep = []
        for s in self.active:
            if s.finish is None and s.job.cancelled.is_set():
                s.finish = "cancelled"
            if s.finish is None:
                keep.append(s)
                continue
            s.sampler.close()
            s.slot.busy = False
            s.slot.last_used = time.monotonic()
        if len(keep) != len(self.active):
            self.active = keep
            self.stats["busy_slots"] = self.busy_slots()

    def _step(self) -> None:
        batch, ctx = self.batch, self.ctx
        batch.clear()
        fed: list[tuple[_Seq, list[int]]] = []
        t0 = time.perf_counter()
        # 1. one token for every generating sequence
        for s in self.active:
            s.row = -1
            if s.next_token is not None:
                s.row = batch.add(s.next_token, s.pos, s.slot.seq, True)
                fed.append((s, [s.next_token]))
                s.pos += 1
                s.next_token = None
        # 2. prompt chunks with what is left of the batch
        for s in self.active:
            room = batch.capacity - batch.n
            if not s.pending or room <= 0:
                continue
            chunk, s.pending = s.pending[:room], s.pending[room:]
            for j, tok in enumerate(chunk):
                r = batch.add(tok, s.pos + j, s.slot.seq, not s.pending and j == len(chunk) - 1)
            if not s.pending:
                s.row = r
            s.pos += len(chunk)
            fed.append((s, chunk))
        if batch.n == 0:
            # only followers waiting on a leader that has nothing to feed: cannot happen, but never spin
            time.sleep(0.001)
            return
        ctx.decode(batch)
        self.stats["steps"] += 1
        for s, toks in fed:
            s.slot.cached.extend(toks)
        now = time.perf_counter()
        # followers: copy the leader's prompt KV once its last prompt token has logits
        for s in self.active:
            lead = s.leader
            if lead is not None and lead.row >= 0 and s.row < 0 and s.n_gen == 0 and s.next_token is None:
                ctx.seq_cp(lead.slot.seq, s.slot.seq, -1, -1)
                s.slot.cached = list(lead.slot.cached)
                s.pos = lead.pos
                s.row = lead.row
                s.leader = None
        events: list[tuple[Job, Event]] = []
        for s in self.active:
            if s.row < 0 or s.finish is not None:
                continue
            self._sample(s, now, events)
        for job, ev in events:
            job.queue.put(ev)
        if self.on_step is not None:
            self.on_step({"seconds": now - t0, "generated": sum(1 for s in self.active if s.row >= 0)})

    def _sample(self, s: _Seq, now: float, events: list[tuple[Job, Event]]) -> None:
        job, p = s.job, s.job.params
        tok = s.sampler.sample(self.ctx, s.row)
        if job.t_first is None:
            job.t_first = now
        if p.best_of > p.n:  # rank choices by the log-probability of what they sampled
            x = self.ctx.logits(s.row)
            m = float(x.max())
            s.logprob += float(x[tok]) - m - math.log(float(np.exp(x - m).sum()))
        if self.model.is_eog(tok):
            self._finish(s, "stop", events)
            return
        s.n_gen += 1
        job.completion_tokens += 1
        piece = s.text.feed(self.model.token_piece(tok))
        if piece:
            self._emit(s, piece, events)
        if s.text.stopped:
            self._finish(s, "stop", events)
        elif (p.max_tokens is not None and s.n_gen >= p.max_tokens) or s.pos >= self.n_ctx_seq:
            self._finish(s, "length", events)
        else:
            s.next_token = tok

    def _emit(self, s: _Seq, text: str, events: list[tuple[Job, Event]]) -> None:
        if s.job.params.best_of > s.job.params.n or not s.job.stream:
            s.out.append(text)
        else:
            events.append((s.job, Event("text", s.index, text)))

    def _finish(self, s: _Seq, reason: str, events: list[tuple[Job, Event]]) -> None:
        tail = s.text.flush()
        if tail:
            self._emit(s, tail, events)
        s.finish = reason
        p = s.job.params
        if p.best_of <= p.n:
            if not s.job.stream and s.out:
                events.append((s.job, Event("text", s.index, "".join(s.out))))
            events.append((s.job, Event("done", s.index, finish_reason=reason, tokens=s.n_gen)))
            return
        group = s.job.seqs
        if all(x.finish is not None for x in group):  # pick the n most likely of best_of
            best = sorted(group, key=lambda x: x.logprob / max(x.n_gen, 1), reverse=True)[:p.n]
            for i, x in enumerate(best):
                events.append((s.job, Event("text", i, "".join(x.out))))
                events.append((s.job, Event("done", i, finish_reason=x.finish, tokens=x.n_gen)))
