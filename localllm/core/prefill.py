"""How a step's batch is made: prompts' chunks or pieces beside the generating rows (``--prefill``).

Each scheduler step decodes one token of every generating sequence (its *row*)
and some prompt tokens. How many prompt tokens, and how, is the trade-off
between a stream already answering and a long prompt waiting for its first
token:

* ``exact`` (the default): a prompt is read in canonical chunks (:mod:`lanes`), at
  most **one** chunk per step while any sequence is generating, then the rows;
  prompt tails (after the last cut) fill the step up to one chunk's tokens. So a
  stream waits at most one chunk (up to 512 tokens) between two tokens, and
  every prompt stays reusable bit for bit. The rows go into the chunk's own
  ``llama_decode`` (the chunk first) where that is bit for bit the chunk alone
  (:meth:`Prefill.beside`), else the chunk is decoded alone, then the rows.
  llama.cpp splits a batch over several KV streams into equal micro-batches over
  consecutive sequence ids, so the chunk either keeps a micro-batch of its own
  (no row of the next sequence id) or shares its first one with a row (split
  1 + 1, then 511). Measured with ``benchmarks/row_invariance.py --questions
  beside`` (a 512-token chunk beside one token of another sequence, then the
  logits of the chunk's next token; 2026-12-06, llama-cpp-python 0.3.36, Xeon
  with AMX, smollm2-135m Q6_K (the default here) and Q4_0 repacked): with flash
  attention **off**, bit-equal in every arrangement; with flash attention
  **on** (auto, on a CPU), bit-equal when the chunk keeps its own micro-batch,
  max |diff| 0.54 (Q6_K) and 0.37 (Q4_0) when it shares one. Saved time: none
  measurable (the two micro-batches are two graph computes either way); it
  spares one ``llama_decode`` call.
* ``fair`` (or ``fair:K``): while others are generating, a prompt goes in
  *pieces* inside the rows' batch, one ``llama_decode`` per step, sized online
  so that a step takes about ``K`` times a rows-only decode (``fair`` is
  ``fair:2``): an EWMA of the rows-only decode time and of each piece's cost
  per prompt token, the piece clamped to [16, chunk]. On a CPU a step costs the
  rows' time plus the piece's (no overlap), so a stream's gap of ``K`` times its
  own step lets the prompt use ``(K-1)/K`` of the time: its first token comes at
  least ``1/(K-1)`` later than alone (``K`` = 3: +50 %; +25 % needs ``K`` ≥ 5). When
  nothing else is generating it reads canonical chunks at full speed. A piece is
  not a canonical chunk, so the prompt's KV is not reusable past the last cut
  before its first piece: ``slot.exact`` stays there and the prompt is not saved
  to the prompt cache. The scheduler gives ``fair`` a unified KV cache, so the
  rows and the piece are one micro-batch (one pass over the weights), at the
  price of answers that depend on the batch. docs/serve.md ("Fairness") has the
  measured costs (with flash attention off on a CPU: llama.cpp's CPU kernel is
  slow for small batches at depth).

Example:
    >>> parse("fair:4"), parse("fair"), parse("exact")
    (('fair', 4.0), ('fair', 2.0), ('exact', 0.0))
    >>> p = Prefill("fair", unit=512, shared=False)
    >>> p.budget()          # nothing measured yet: a rows-only step first
    0
    >>> p.observe(0.010, rows=1, prompt=0); p.budget()     # then the smallest piece
    16
    >>> p.observe(0.020, rows=1, prompt=16); p.budget()    # 10 ms of rows ≈ 16 tokens of 0.625 ms
    16
    >>> q = Prefill("fair:4", unit=512, shared=False)     # a step of about 4 rows-only steps
    >>> q.observe(0.010, rows=1, prompt=0); q.observe(0.020, rows=1, prompt=16); q.budget()
    48
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localllm import runtime
    from localllm.core.lanes import Lane

MODES = ("exact", "fair")
FAIR_GAP = 2.0   # "fair": a step beside a prompt takes about this many rows-only steps
MAX_GAP = 1000.0
MIN_PIECE = 16   # a fair piece is at least this long (below it a step's fixed cost dominates)
ALPHA = 0.25     # weight of the newest sample in the EWMAs


class Prefill:
    """One scheduler's policy: which prompt tokens go into each step, and how they are decoded.

    ``unit``: the canonical chunk length; ``shared``: whether a canonical chunk may share its
    ``llama_decode`` with the rows (bit for bit the chunk alone: see the module's docstring)."""

    def __init__(self, mode: str, *, unit: int, shared: bool) -> None:
        self.mode, self.gap = parse(mode)
        self.unit, self.shared = unit, shared
        self.t_rows: float | None = None   # EWMA: seconds of a decode of the generating rows alone
        self.t_token: float | None = None  # EWMA: seconds per prompt token of a fair piece beside them

    # ------------------------------------------------------------------ the budget
    def budget(self) -> int:
        """Prompt tokens a fair step carries beside the rows: ``gap - 1`` rows-only decodes' worth,
        in [MIN_PIECE, unit]; 0 until a rows-only decode has been timed."""
        if self.t_rows is None:
            return 0
        if self.t_token is None:
            return MIN_PIECE
        return max(MIN_PIECE, min(self.unit, int((self.gap - 1) * self.t_rows / self.t_token)))

    def observe(self, seconds: float, *, rows: int, prompt: int) -> None:
        """Time of one ``llama_decode`` of ``rows`` generating tokens and ``prompt`` prompt tokens."""
        if rows and not prompt:
            self.t_rows = _ewma(self.t_rows, seconds)
        elif rows and self.t_rows is not None:
            self.t_token = _ewma(self.t_token, max(seconds - self.t_rows, 1e-6) / prompt)  # never 0: a divisor

    # ------------------------------------------------------------------ one step
    def step(self, ctx: runtime.Context, batch: runtime.Batch, lanes: list[Lane],
             chunk_done: Callable[[Lane], None], tail_done: Callable[[Lane], None]) -> tuple[set[int], int, int]:
        """Decode this step's prompt tokens and rows; ``chunk_done(lane)`` after each canonical chunk,
        ``tail_done(lane)`` after a prompt's tail (its logits are read before the next decode).
        Returns the sequences fed, the prompt tokens and the other tokens decoded (the rows)."""
        prompting = [lane for lane in lanes if lane.prompting()]
        rows = [lane for lane in lanes if lane.pending and not lane.prompting()]
        if self.mode == "fair" and rows and prompting:
            return self._fair(ctx, batch, rows, prompting)
        return self._canonical(ctx, batch, rows, prompting, chunk_done, tail_done)

    def _fair(self, ctx: runtime.Context, batch: runtime.Batch, rows: list[Lane],
              prompting: list[Lane]) -> tuple[set[int], int, int]:
        """The rows, then pieces of the prompts up to the budget, in one ``llama_decode``."""
        batch.clear()
        n_rows = _feed_rows(batch, rows)
        left = self.budget()
        for lane in prompting:
            if left <= 0:
                break
            left -= lane.feed_piece(batch, left)
        n_prompt = batch.n - n_rows
        self._decode(ctx, batch, rows=n_rows, prompt=n_prompt)
        return _decoded(rows + prompting), n_prompt, n_rows

    def _canonical(self, ctx: runtime.Context, batch: runtime.Batch, rows: list[Lane], prompting: list[Lane],
                   chunk_done: Callable[[Lane], None],
                   tail_done: Callable[[Lane], None]) -> tuple[set[int], int, int]:
        """Canonical chunks (one per step while rows wait, else up to a chunk's tokens of them), each
        alone or beside the rows where that is bit for bit the same (:meth:`beside`); then prompt
        tails, each alone and whole (beside other sequences llama.cpp would split a tail into
        micro-batches as long as theirs, which round differently from the same prompt alone: one of
        8 concurrent greedy answers changed), then the rows."""
        fed: set[int] = set()
        n_prompt, last = 0, None  # prompt tokens decoded; a chunk the rows join
        while n_prompt < self.unit and not (rows and n_prompt):
            lane = next((lane for lane in prompting if lane.cuts), None)
            if lane is None:
                break
            batch.clear()
            n_prompt += lane.feed_chunk(batch)
            fed.add(lane.slot.seq)
            if rows and self.beside(lane, rows):
                last = lane
                break
            ctx.decode(batch)
            lane.decoded()
            chunk_done(lane)
        # tails: at most a chunk's tokens in all while rows wait, none after a chunk the rows join
        room = 0 if last else (self.unit - n_prompt if rows else batch.capacity)
        for lane in prompting:
            if lane.pending and not lane.cuts and len(lane.pending) <= room:
                batch.clear()
                n = lane.feed(batch)
                ctx.decode(batch)
                lane.decoded()
                fed.add(lane.slot.seq)
                tail_done(lane)
                room, n_prompt = room - n, n_prompt + n
        if last is None:
            batch.clear()
        n_before = batch.n
        n_rows = _feed_rows(batch, rows)
        if batch.n:
            self._decode(ctx, batch, rows=n_rows, prompt=n_before)
        fed |= _decoded(rows + prompting)
        if last is not None:
            chunk_done(last)
        return fed, n_prompt, n_rows

    def beside(self, lane: Lane, rows: list[Lane]) -> bool:
        """Whether ``lane``'s chunk, first in the batch, may share a ``llama_decode`` with ``rows`` and
        still be bit for bit the chunk alone: with flash attention off always (``shared``); else when
        it keeps a micro-batch of its own, i.e. no row is of the next sequence id (llama.cpp splits a
        multi-stream batch into equal micro-batches over consecutive sequence ids)."""
        return self.shared or all(r.slot.seq != lane.slot.seq + 1 for r in rows)

    def _decode(self, ctx: runtime.Context, batch: runtime.Batch, *, rows: int, prompt: int) -> None:
        import time

        t0 = time.perf_counter()
        ctx.decode(batch)
        self.observe(time.perf_counter() - t0, rows=rows, prompt=prompt)


def parse(prefill: str) -> tuple[str, float]:
    """``"exact"``, ``"fair"`` or ``"fair:K"`` → (mode, K): K (a number in (1, 1000]) is how many
    rows-only steps a step beside a prompt's piece should take (0 for exact)."""
    mode, _, k = str(prefill).partition(":")
    if mode == "exact" and not _:
        return "exact", 0.0
    if mode == "fair":
        if not _:
            return "fair", FAIR_GAP
        gap = float(k) if re.fullmatch(r"\d+(\.\d+)?", k) else float("nan")   # no signs, spaces, _ or e
        if 1.0 < gap <= MAX_GAP:
            return "fair", gap
    raise ValueError(f"prefill must be exact, fair or fair:K with K a number above 1 and at most {MAX_GAP:g} "
                     f"(got {prefill!r})")


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + ALPHA * (new - old)


def _feed_rows(batch: runtime.Batch, rows: list[Lane]) -> int:
    """The generating lanes' tokens: one token (or a beam's short tail, a draft) each first, then
    longer tails with the room left. Returns how many tokens went in."""
    n = sum(lane.feed(batch) for lane in rows if len(lane.pending) <= 64)
    return n + sum(lane.feed(batch) for lane in rows if lane.pending)


def _decoded(lanes: list[Lane]) -> set[int]:
    """Mark what the lanes fed as decoded; the sequences that were fed."""
    seqs = set()
    for lane in lanes:
        if lane.fed:
            seqs.add(lane.slot.seq)
            lane.decoded()
    return seqs
