"""Fair scheduling (localllm/core/prefill.py), on the default model, driving the Scheduler step by step.

A stream is generating when a ~2000-token prompt arrives. Checked structurally per step (never
by wall time): with ``prefill="exact"`` a step decodes at most one canonical chunk and the stream
gets its token in that same step, and the long prompt's numbers and its reuse are those of reading
it alone; with ``prefill="fair"`` its pieces stay within the step's budget, the stream gets a
token every step, and a prompt read in pieces is never reused past its last canonical cut."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from localllm import runtime
from localllm.core.lanes import cuts
from localllm.core.prompt_cache import PromptCache
from localllm.core.request import Request, collect
from localllm.core.scheduler import Scheduler
from localllm.sampling import SamplingParams

N_CTX = 2304
STREAM = SamplingParams(max_tokens=600, temperature=0, ignore_eos=True)
LONG = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)


@pytest.fixture(scope="module")
def llama(default_model_path: Path):
    m = runtime.LlamaModel(default_model_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def prompts(llama) -> dict[str, list[int]]:
    text = " ".join(f"Note {i}: the {w} is kept on shelf {i % 7} beside the {v}." for i, (w, v) in
                    enumerate(zip(["salt", "flour", "rice", "tea", "oil", "sugar", "beans", "honey"] * 30,
                                  ["cups", "jars", "pans", "bowls", "forks"] * 48)))
    ids = llama.tokenize(text, add_special=True, parse_special=False)
    assert len(ids) > 2100
    return {"long": ids[:2000], "other": ids[:1900] + llama.tokenize(" Where is the tea?", add_special=False, parse_special=False),
            "stream": llama.tokenize("Count slowly from one to one thousand: one, two,", add_special=True, parse_special=False)}


def _scheduler(llama, mode: str, steps: list[dict[str, Any]] | None = None, **kw: Any) -> Scheduler:
    return Scheduler(llama, n_slots=2, n_ctx_seq=N_CTX, n_threads=2, prefill=mode,
                     on_step=None if steps is None else steps.append, **kw)


def _tokens(sched: Scheduler, req: Request) -> int:
    """How many tokens ``req``'s (only) choice has generated so far."""
    return next((len(u.choices[0].tokens) for u in sched.active if u.req is req), -1)


def _alone(llama, mode: str, prompt: list[int]):
    """``prompt``'s answer (choice) and cached tokens when nothing else runs."""
    s = _scheduler(llama, mode)
    try:
        r = Request(prompt, LONG)
        (c,) = collect(s.run(r), 1)
        return c, r.cached_tokens
    finally:
        s.close()


def _contended(sched: Scheduler, prompts: dict[str, list[int]], *, long_first: int = 0):
    """Read the long prompt while the stream generates. Per step: prompt tokens decoded, the fair
    budget the step had, whether the stream got a token, and whether the long prompt was still being
    read. ``long_first``: steps the long prompt gets alone before the stream arrives. Returns that
    log and the long request's choice."""
    steps: list[dict[str, Any]] = []
    sched.on_step = steps.append
    long, stream = Request(prompts["long"], LONG), Request(prompts["stream"], STREAM)
    if long_first:
        sched.submit(long)
        for _ in range(long_first):
            sched.step()
    sched.submit(stream)
    while _tokens(sched, stream) < 1:
        sched.step()
    if not long_first:
        sched.submit(long)
    log, events = [], []
    while not long.done:
        before, budget, reading = _tokens(sched, stream), sched.prefill.budget(), long.t_first is None
        assert sched.step()
        events += long.drain()
        log.append({"prompt": steps[-1]["prompt_tokens"], "budget": budget, "reading": reading,
                    "stream_token": _tokens(sched, stream) > before})
        assert len(log) < 1000
    stream.cancel()
    sched.step()
    (choice,) = collect(iter(events), 1)
    return log, choice


def test_exact_decodes_one_chunk_per_step_and_keeps_the_numbers(llama, prompts) -> None:
    sched = _scheduler(llama, "exact")
    try:
        log, got = _contended(sched, prompts)
        reading = [s for s in log if s["reading"]]
        assert sum(s["prompt"] for s in reading) == len(prompts["long"])
        assert max(s["prompt"] for s in reading) == sched.unit  # read in canonical chunks
        for i, s in enumerate(log):
            if s["prompt"]:  # never more than one chunk while the stream waits, and it gets its token
                assert s["prompt"] <= sched.unit and s["stream_token"], (i, s)
        # a later prompt sharing the first 1900 tokens reuses the long one's chunks up to its last cut
        other = Request(prompts["other"], LONG)
        list(sched.run(other))
        assert other.cached_tokens == max(c for c in cuts(prompts["long"], eog=sched.eog, unit=sched.unit)
                                          if c <= 1900)
    finally:
        sched.close()
    want, cached = _alone(llama, "exact", prompts["long"])
    assert cached == 0
    # the prompt's numbers are a lone read's, bit for bit: its first token's log-probabilities (the next
    # tokens are rows beside the stream's row, which round like any batched rows: greedy, the same tokens)
    assert got.tokens == want.tokens
    first = [(t.token, t.logprob, t.top) for t in (got.logprobs[0], want.logprobs[0])]
    assert first[0] == first[1]


def test_fair_feeds_pieces_within_the_budget_beside_every_stream_token(llama, prompts, tmp_path: Path) -> None:
    sched = _scheduler(llama, "fair")
    sched.prompt_cache = PromptCache(tmp_path, {"model": "fairness test"})
    try:
        # two canonical chunks while nothing else generates, then pieces beside the stream
        log, _ = _contended(sched, prompts, long_first=1)
        reading = [s for s in log if s["reading"]]
        assert sum(s["prompt"] for s in reading) == len(prompts["long"]) - 2 * sched.unit
        for i, s in enumerate(reading):
            assert s["stream_token"] and s["prompt"] <= s["budget"], (i, s)
        assert all(16 <= s["budget"] <= sched.unit for s in reading[1:])  # the first one times the rows alone
        assert any(0 < s["prompt"] < sched.unit for s in reading)
        # read in pieces past 1024: reused (from memory or from disk) up to 1024, never further
        (slot,) = [s for s in sched.slots if s.cached[:10] == prompts["long"][:10]]
        assert slot.exact == 2 * sched.unit
        sched.prompt_cache.flush()
        entry = sched.prompt_cache.lookup(prompts["other"], have=0)
        assert entry is None or len(entry.tokens) <= 2 * sched.unit
        other = Request(prompts["other"], LONG)
        list(sched.run(other))
        assert other.cached_tokens == 2 * sched.unit
    finally:
        sched.close()


def test_fair_reads_chunks_at_full_speed_when_nothing_else_generates(llama, prompts) -> None:
    steps: list[dict[str, Any]] = []
    sched = _scheduler(llama, "fair", steps)
    try:
        r = Request(prompts["long"], LONG)
        list(sched.run(r))
        # nobody waits: a chunk a step, and the last one with the tail (as many tokens as the batch holds)
        assert [s["prompt_tokens"] for s in steps[:3]] == [512, 512, len(prompts["long"]) - 1024]
        slot = next(s for s in sched.slots if s.cached[:10] == prompts["long"][:10])
        assert slot.exact == 1536
    finally:
        sched.close()
