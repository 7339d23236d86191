"""Beam search as sequences of the shared batch, so other requests keep
decoding while it runs.

Each of the ``K`` beams is a lane. After a decode, every live hypothesis
proposes its ``K + 1`` most likely next tokens (log-softmax of the model's
logits; with a grammar, only the tokens it allows). The ``K`` best
continuations survive; an end-of-generation token among the ``K`` best
candidates finishes a hypothesis. Search stops when ``K`` hypotheses have
finished, or at the length limit; the answer is the finished hypothesis with
the best length-normalised score (summed log-probability / tokens).

A surviving hypothesis is placed on the lane whose KV shares the longest
prefix with it; only the differing tail is decoded again, in the same batch
as everyone else's tokens. ``num_beams=1`` is greedy decoding.

Example:
    >>> unit = Beams(request, lanes, model, n_ctx=2048)     # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from localllm import runtime
from localllm.core import lanes as lanes_mod
from localllm.core.logprobs import TokenLogprob, log_normalizer, token_logprob
from localllm.core.request import Event, Request
from localllm.textstream import TextStream

if TYPE_CHECKING:
    from localllm.core.lanes import Lane


@dataclass
class _Hyp:
    tokens: list[int]
    score: float
    lps: list[TokenLogprob]
    grammar: runtime.Grammar | None
    lane: Lane | None = None
    logits: np.ndarray | None = None  # copied when its lane's row is ready: lanes may finish in different steps


class Beams:
    """One beam-search request (a unit of the scheduler)."""

    def __init__(self, req: Request, lanes: list[Lane], model: runtime.LlamaModel, *, n_ctx: int) -> None:
        p = req.params
        self.req, self.lanes, self.model, self.n_ctx = req, lanes, model, n_ctx
        self.k = p.num_beams
        self.plen = len(req.prompt)
        self.limit = min(p.max_tokens or n_ctx, n_ctx - self.plen)
        text = p.grammar_text()
        self.root = runtime.Grammar(model, text) if text else None
        self.ban = model.eog_mask.copy() if p.ignore_eos else None
        self.alive: list[_Hyp] = []
        self.done: list[tuple[_Hyp, str]] = []
        self.started = False
        self.finished = False

    def close(self) -> None:
        for h in self.alive:
            if h.grammar is not None and h.grammar is not self.root:
                h.grammar.close()
        self.alive = []
        if self.root is not None:
            self.root.close()
            self.root = None

    # ------------------------------------------------------------------ one step
    def after_decode(self, ctx: runtime.Context, now: float, events: list[Event]) -> None:
        if not self.started:
            lead = self.lanes[0]
            if lead.row < 0:
                return  # the prompt is still being decoded
            for lane in self.lanes[1:]:  # every lane starts from the prompt
                lanes_mod.copy(ctx, lead, lane)
            self.alive = [_Hyp([], 0.0, [], self.root, lead)]
            self.started = True
            self.req.t_first = now
        for h in self.alive:
            if h.logits is None and h.lane is not None and h.lane.row >= 0:
                h.logits = ctx.logits(h.lane.row).copy()
        if any(h.logits is None for h in self.alive):
            return  # a lane still has tokens to decode again (a long tail over several steps)
        step = len(self.alive[0].tokens)
        cands = self._candidates(ctx)
        eog = self.model.eog_mask
        nxt: list[tuple[float, int, int, TokenLogprob]] = []
        for rank, (score, b, t, lp) in enumerate(cands):
            if eog[t]:
                if rank < self.k:  # an end among the K best candidates finishes a hypothesis
                    h = self.alive[b]
                    self.done.append((_Hyp(h.tokens, score, h.lps, None), "stop"))
                continue
            nxt.append((score, b, t, lp))
            if len(nxt) == self.k:
                break
        if len(self.done) >= self.k or not nxt:
            self._finish(events)
            return
        if step + 1 >= self.limit:
            for score, b, t, lp in nxt:
                h = self.alive[b]
                self.done.append((_Hyp(h.tokens + [t], score, h.lps + [lp], None), "length"))
            self._finish(events)
            return
        self._advance(ctx, nxt)

    def _candidates(self, ctx: runtime.Context) -> list[tuple[float, int, int, TokenLogprob]]:
        """(score, hypothesis, token, logprob) for each hypothesis's K+1 best allowed tokens, best first."""
        k1 = self.k + 1
        top = self.req.params.top_logprobs if self.req.params.logprobs else 0
        out = []
        for b, h in enumerate(self.alive):
            x = h.logits
            assert x is not None
            lse = log_normalizer(x)
            mask = None
            if h.grammar is not None:
                mask = h.grammar.allowed(np.arange(x.size, dtype=np.int32))
            if self.ban is not None:
                mask = ~self.ban if mask is None else mask & ~self.ban
            y = x if mask is None else np.where(mask, x, -np.inf)
            m = min(k1, int(np.isfinite(y).sum()))
            if m == 0:
                continue
            idx = np.argpartition(-y, m - 1)[:m]
            for t in idx:
                lp = token_logprob(x, int(t), top=top, piece=self.model.token_piece, lse=lse)
                out.append((h.score + lp.logprob, b, int(t), lp))
        out.sort(key=lambda c: (-c[0], c[1], c[2]))
        return out

    def _advance(self, ctx: runtime.Context, nxt: list[tuple[float, int, int, TokenLogprob]]) -> None:
        """The survivors become the hypotheses; place each on the lane sharing most of its tokens."""
        new = []
        for score, b, t, lp in nxt:
            h = self.alive[b]
            g = None
            if h.grammar is not None:
                g = h.grammar.clone()
                g.accept(t)
            new.append(_Hyp(h.tokens + [t], score, h.lps + [lp], g))
        for h in self.alive:
            if h.grammar is not None and h.grammar is not self.root:
                h.grammar.close()
        free = list(self.lanes)
        plen = self.plen
        for h in new:
            def shared(lane: Lane) -> int:
                held = lane.slot.cached[plen:]
                n = 0
                for a, c in zip(held, h.tokens[:-1]):
                    if a != c:
                        break
                    n += 1
                return n
            lane = max(free, key=shared)
            free.remove(lane)
            keep = lanes_mod.truncate(ctx, lane.slot, plen + shared(lane))
            full = self.req.prompt + h.tokens
            lane.pending = full[keep:]
            lane.pos = keep
            lane.row = -1
            h.lane = lane
        self.alive = new

    def _finish(self, events: list[Event]) -> None:
        if not self.done:  # nothing can follow (a grammar with no way on): the best so far
            self.done = [(h, "length") for h in self.alive] or [(_Hyp([], 0.0, [], None), "stop")]
        best, reason = max(self.done, key=lambda d: d[0].score / max(len(d[0].tokens), 1))
        p = self.req.params
        text = TextStream(p.stop)
        out = []
        for lp in best.lps:
            lp.offset = text.position
            out.append(text.feed(lp.bytes))
        out.append(text.flush())
        joined = "".join(out)
        if text.stopped:
            reason = "stop"
        lps = [lp for lp in best.lps if lp.offset < len(joined)] if p.logprobs else None
        self.req.completion_tokens = len(best.tokens)
        events.append(Event("text", 0, joined, logprobs=lps))
        events.append(Event("done", 0, finish_reason=reason, tokens=list(best.tokens), stop_sequence=text.matched))
        for lane in self.lanes:
            lane.pending = []
        self.finished = True
