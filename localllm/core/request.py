"""A generation request, the events it reports, and its finished choices.

Example:
    >>> from localllm.sampling import SamplingParams
    >>> req = Request([1, 2, 3], SamplingParams(max_tokens=4))
    >>> req.params.max_tokens, req.done
    (4, False)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from localllm.core.logprobs import TokenLogprob
from localllm.core.reasoning import REASONING, Splitter, Thinking
from localllm.errors import LocalLLMError
from localllm.sampling import SamplingParams


@dataclass
class Event:
    """What a request reports: ``kind`` is "text", "reasoning" (a reasoning model's thinking, parted
    from the text when the request has :class:`Thinking`), "done" (one choice finished) or "error"."""

    kind: str
    index: int = 0
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)  # "done": the choice's generated token ids
    stop_token: int | None = None                    # "done": the end-of-generation token, if one ended it
    stop_sequence: str | None = None                 # "done": the stop string, if one ended it
    error: LocalLLMError | None = None


@dataclass
class Choice:
    """One finished choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    stop_token: int | None = None  # the end-of-generation token that ended it (not in ``tokens``)
    stop_sequence: str | None = None  # the stop string that ended it (not in ``text``)
    reasoning: str = ""  # a reasoning model's thinking (never in ``text``)


class Request:
    """A prompt (token ids) and its :class:`SamplingParams`. The core reports
    :class:`Event` objects on a queue; ``stream=False`` gets each choice's text
    in one event at its end (waking a waiting thread per token would fight the
    decode thread for the GIL). ``cuts``: positions to cut the prompt's canonical
    chunks at besides the usual ones (:func:`localllm.core.lanes.cuts`), for a
    caller that reuses prefixes of its own making (``bench --depth``). ``thinking``: the
    answer's reasoning markers (:mod:`localllm.core.reasoning`); its text events are then parted
    into "reasoning" and "text" events, and ``params.reasoning_budget`` is enforced."""

    def __init__(self, prompt: list[int], params: SamplingParams, *, stream: bool = True,
                 cuts: Sequence[int] = (), thinking: Thinking | None = None) -> None:
        self.prompt = prompt
        self.params = params
        self.thinking = thinking
        self._splitters: dict[int, Splitter] = {}
        self.stream = stream
        self.cuts = [c for c in cuts if 0 < c < len(prompt)]
        self.queue: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.t_submit = time.perf_counter()
        self.t_start: float | None = None   # admitted into slots
        self.t_first: float | None = None   # first token sampled
        self.t_end: float | None = None     # every choice done
        self.cached_tokens = 0
        self.completion_tokens = 0
        self.remaining = params.n           # choices not yet done
        self.done = False

    def cancel(self) -> None:
        """Stop generating (the client went away); the slots are freed at the next step."""
        self.cancelled.set()

    def events(self, disconnected: Callable[[], bool] | None = None) -> Iterator[Event]:
        """Block for events until every choice is done (another thread drives the
        scheduler). ``disconnected`` is polled while waiting; errors are raised."""
        while not self.done:
            try:
                ev = self.queue.get(timeout=0.25)
            except queue.Empty:
                if disconnected is not None and disconnected():
                    self.cancel()
                    return
                continue
            yield from self._take(ev)

    def drain(self) -> Iterator[Event]:
        """The events already reported (non-blocking), errors raised."""
        while True:
            try:
                ev = self.queue.get_nowait()
            except queue.Empty:
                return
            yield from self._take(ev)

    def _take(self, ev: Event) -> Iterator[Event]:
        if ev.kind == "error":
            self.done = True
            assert ev.error is not None
            raise ev.error
        if ev.kind == "done":
            self.remaining -= 1
            if self.remaining <= 0:
                self.done = True
        if self.thinking is not None and ev.kind in ("text", "done"):
            yield from self._split(ev)
        else:
            yield ev

    def _split(self, ev: Event) -> Iterator[Event]:
        """A text event as its reasoning and content parts (the log-probabilities go with the last
        part); at a choice's end, the text its splitter held back, then the end."""
        assert self.thinking is not None
        sp = self._splitters.get(ev.index)
        if sp is None:
            sp = self._splitters[ev.index] = Splitter(self.thinking.markers, inside=self.thinking.inside)
        parts = sp.feed(ev.text) if ev.kind == "text" else sp.flush()
        out = [Event(REASONING if kind == REASONING else "text", ev.index, text) for kind, text in parts]
        if ev.kind == "text" and ev.logprobs is not None:
            if not out:
                out.append(Event("text", ev.index))
            out[-1].logprobs = ev.logprobs
        yield from out
        if ev.kind == "done":
            del self._splitters[ev.index]
            yield ev


def collect(events: Iterator[Event], n: int) -> list[Choice]:
    """Gather a request's events into its finished choices."""
    choices = [Choice(i) for i in range(n)]
    for ev in events:
        c = choices[ev.index]
        if ev.kind in ("text", "reasoning"):
            if ev.kind == "text":
                c.text += ev.text
            else:
                c.reasoning += ev.text
            if ev.logprobs is not None:
                c.logprobs = (c.logprobs or []) + ev.logprobs
        elif ev.kind == "done":
            c.finish_reason = ev.finish_reason
            c.tokens = ev.tokens
            c.stop_token = ev.stop_token
            c.stop_sequence = ev.stop_sequence
            if ev.logprobs is not None:
                c.logprobs = (c.logprobs or []) + ev.logprobs
    return choices
