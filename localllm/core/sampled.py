"""Sampled choices: ``n`` choices, or ``best_of`` candidates of which the ``n``
with the best mean log-probability are kept. Each choice is a lane of the
shared batch with its own llama.cpp sampler chain (choice ``i`` is seeded
``seed + i``); the prompt is decoded once and copied to the other lanes.

Example:
    >>> unit = Sampled(request, lanes, model, n_ctx=2048)     # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from localllm import runtime
from localllm.core import lanes as lanes_mod
from localllm.core.logprobs import TokenLogprob, token_logprob
from localllm.core.reasoning import Budget
from localllm.core.request import Event, Request
from localllm.core.speculate import Drafter
from localllm.textstream import TextStream

if TYPE_CHECKING:
    from localllm.core.lanes import Lane


class _Choice:
    def __init__(self, index: int, lane: Lane, sampler: runtime.Sampler, stop: tuple[str, ...]) -> None:
        self.index, self.lane, self.sampler = index, lane, sampler
        self.text = TextStream(stop)
        self.tokens: list[int] = []
        self.sum_lp = 0.0                      # best_of's score: the end token's logprob counts too
        self.n_scored = 0
        self.stop_token: int | None = None
        self.lps: list[TokenLogprob] = []      # not yet released with text
        self.out: list[str] = []               # buffered text (non-streaming, best_of)
        self.out_lps: list[TokenLogprob] = []
        self.finish: str | None = None
        self.draft: list[int] = []             # fed after the last token, to be verified
        self.budget: Budget | None = None      # the thinking budget (reasoning_budget)


class Sampled:
    """One request's sampled choices (a unit of the scheduler)."""

    def __init__(self, req: Request, lanes: list[Lane], model: runtime.LlamaModel, *, n_ctx: int,
                 speculate: bool = False) -> None:
        p = req.params
        self.req, self.lanes, self.model, self.n_ctx = req, lanes, model, n_ctx
        bias = dict(p.logit_bias or {})
        if p.ignore_eos:
            for t in model.eog_tokens():
                bias[t] = -math.inf
        grammar = p.grammar_text()
        self.choices: list[_Choice] = []
        try:
            for i, lane in enumerate(lanes):
                s = runtime.Sampler(model, temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
                                    repeat_penalty=p.repeat_penalty, presence_penalty=p.presence_penalty,
                                    frequency_penalty=p.frequency_penalty, repeat_last_n=p.repeat_last_n,
                                    seed=None if p.seed is None else (p.seed + i) & 0xFFFFFFFF, grammar=grammar,
                                    logit_bias=bias or None)
                self.choices.append(_Choice(i, lane, s, p.stop))
                s.prime(req.prompt)
                if req.thinking is not None and p.reasoning_budget is not None:
                    self.choices[-1].budget = Budget(req.thinking, p.reasoning_budget)
        except BaseException:
            self.close()
            raise
        self.ranked = p.best_of > p.n
        self.want_lp = p.logprobs or self.ranked
        self.buffer = self.ranked or not req.stream
        self.waiting = len(lanes) > 1  # followers wait for the lead's prompt
        self.finished = False
        # prompt lookup drafts for one greedy choice (what the checks of exactness cover)
        self.drafter = (Drafter(req.prompt) if speculate and len(self.choices) == 1 and not self.ranked
                        and self.choices[0].sampler.argmax_only and self.choices[0].budget is None else None)
        self.drafted = self.taken = 0

    def close(self) -> None:
        for c in self.choices:
            c.sampler.close()

    # ------------------------------------------------------------------ one step
    def after_decode(self, ctx: runtime.Context, now: float, events: list[Event]) -> None:
        lead = self.lanes[0]
        if self.waiting and lead.row >= 0:
            for lane in self.lanes[1:]:
                lanes_mod.copy(ctx, lead, lane)
            self.waiting = False
        for c in self.choices:
            if c.finish is None and c.lane.row >= 0:
                self._sample(c, ctx, now, events)
        if all(c.finish is not None for c in self.choices):
            self.finished = True

    def _sample(self, c: _Choice, ctx: runtime.Context, now: float, events: list[Event]) -> None:
        """The token after the last one fed and, while they match it, the draft's tokens
        (each row's logits give the next); rejected draft tokens leave the KV cache."""
        lane, draft = c.lane, c.draft
        rows = lane.rows if len(lane.rows) == len(draft) + 1 else [lane.row]  # a draft that did not fit
        taken = 0
        tok = None
        for i, row in enumerate(rows):
            tok = self._one(c, ctx, row, lane.pos - (len(rows) - 1 - i), now, events)
            if tok is None or i >= len(draft) or tok != [draft[i]]:
                break
            taken += 1
        c.draft = []
        if len(rows) > 1:
            self.drafted += len(draft)
            self.taken += taken
            if taken < len(draft) and tok is not None:
                keep = len(lane.slot.cached) - (len(draft) - taken)
                lanes_mod.truncate(ctx, lane.slot, keep)
                lane.pos = keep
            if self.drafter is not None:
                self.drafter.record(len(draft), taken)
        if tok is None:
            return
        lane.pending = tok
        if self.drafter is not None:
            self.drafter.accept(c.tokens[len(self.drafter.tokens) - len(self.req.prompt):])
            room = self.n_ctx - lane.pos - 2
            if self.req.params.max_tokens is not None:
                room = min(room, self.req.params.max_tokens - len(c.tokens) - 1)
            c.draft = self.drafter.draft()[:max(room, 0)]
            if c.draft:
                lane.pending += c.draft
                lane.all_rows = True

    def _one(self, c: _Choice, ctx: runtime.Context, row: int, pos: int, now: float,
             events: list[Event]) -> list[int] | None:
        """Sample ``row`` (the token that would go at ``pos``), emit it; returns the tokens to feed
        next (it, or the close marker a spent thinking budget writes instead), or None when the
        choice is finished."""
        req, p, m = self.req, self.req.params, self.model
        if c.budget is not None and c.budget.due():  # before sampling: no token the sampler saw goes unused
            if req.t_first is None:
                req.t_first = now
            return self._force(c, pos, events)
        tok = c.sampler.sample(ctx, row)
        if req.t_first is None:
            req.t_first = now
        lp = token_logprob(ctx.logits(row), tok, top=p.top_logprobs, piece=m.token_piece) if self.want_lp else None
        if lp is not None:
            # an answer that ends is scored by its end token too: otherwise an empty one would win
            c.sum_lp += lp.logprob
            c.n_scored += 1
        if m.is_eog(tok):
            c.stop_token = tok
            self._finish(c, "stop", events)
            return None
        c.tokens.append(tok)
        req.completion_tokens += 1
        piece = m.token_piece(tok)
        if lp is not None:
            lp.offset = c.text.position
            c.lps.append(lp)
        if c.budget is not None:
            c.budget.feed(piece)
        self._emit(c, c.text.feed(piece), events)
        return self._go_on(c, [tok], pos, events)

    def _go_on(self, c: _Choice, toks: list[int], pos: int, events: list[Event]) -> list[int] | None:
        """After ``toks`` were taken at ``pos``...: ``toks`` to feed, or None when the choice ends."""
        p = self.req.params
        if c.text.stopped:
            self._finish(c, "stop", events)
        elif (p.max_tokens is not None and len(c.tokens) >= p.max_tokens) or pos + len(toks) >= self.n_ctx:
            self._finish(c, "length", events)
        else:
            return toks
        return None

    def _force(self, c: _Choice, pos: int, events: list[Event]) -> list[int] | None:
        """The thinking budget is spent: the close marker's tokens are taken instead of the sampled
        one (as many as ``max_tokens`` and the context leave room for), and the answer follows."""
        assert c.budget is not None
        p, m = self.req.params, self.model
        room = self.n_ctx - pos
        if p.max_tokens is not None:
            room = min(room, p.max_tokens - len(c.tokens))
        toks = list(c.budget.thinking.close_ids[:room])
        for t in toks:
            c.tokens.append(t)
            self.req.completion_tokens += 1
            piece = m.token_piece(t)
            c.budget.feed(piece, forced=True)
            self._emit(c, c.text.feed(piece), events)
            if c.text.stopped:
                break
        return self._go_on(c, toks, pos, events)

    def _released(self, c: _Choice) -> list[TokenLogprob] | None:
        """Log-probabilities of the tokens whose text has been released."""
        if not self.req.params.logprobs:
            return None
        end = len(c.text.text)
        k = 0
        while k < len(c.lps) and c.lps[k].offset < end:
            k += 1
        out, c.lps = c.lps[:k], c.lps[k:]
        return out

    def _emit(self, c: _Choice, text: str, events: list[Event]) -> None:
        if not text:
            return
        lps = self._released(c)
        if self.buffer:
            c.out.append(text)
            c.out_lps.extend(lps or ())
        else:
            events.append(Event("text", c.index, text, logprobs=lps))

    def _finish(self, c: _Choice, reason: str, events: list[Event]) -> None:
        self._emit(c, c.text.flush(), events)
        c.lps = []  # tokens past a stop string are not part of the answer
        c.finish = reason
        c.lane.pending = []
        if not self.ranked:
            self._report(c, c.index, events)
            return
        if all(x.finish is not None for x in self.choices):  # keep the n most likely of best_of
            n = self.req.params.n
            best = sorted(self.choices, key=lambda x: (-x.sum_lp / max(x.n_scored, 1), x.index))[:n]
            for i, x in enumerate(best):
                self._report(x, i, events)

    def _report(self, c: _Choice, index: int, events: list[Event]) -> None:
        lps = list(c.out_lps) if self.req.params.logprobs else None
        if self.buffer and (c.out or lps):
            events.append(Event("text", index, "".join(c.out), logprobs=lps))
        events.append(Event("done", index, finish_reason=c.finish, tokens=list(c.tokens), stop_token=c.stop_token,
                            stop_sequence=c.text.matched))
