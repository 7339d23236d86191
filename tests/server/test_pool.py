"""Many models in one process (localllm/server/pool.py), on two real models:
the default SmolLM2 and Gemma-3-270M."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from localllm.core.request import Request, collect
from localllm.errors import ModelTooLargeError, ServiceUnavailableError
from localllm.loader import ModelSettings
from localllm.sampling import SamplingParams
from localllm.server.pool import ModelPool

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _answer(eng, text: str, n: int = 4) -> str:
    req = eng.submit(Request(eng.chat_ids([{"role": "user", "content": text}]),
                             SamplingParams(temperature=0, max_tokens=n), stream=False))
    return collect(req.events(), 1)[0].text


@pytest.fixture()
def sizes(default_model_path: Path, gemma_path: Path) -> dict[str, int]:
    probe = ModelPool(ModelSettings(n_ctx=512), max_memory=1 << 40)

    def need(name: str) -> int:  # what the pool budgets for a model: its plan's RAM (ModelPool.plan, public)
        p = probe.plan(probe.resolve(name)[1])
        return int(p.ram_bytes or p.total_bytes)

    return {SMOL: need(SMOL), GEMMA: need(GEMMA)}


def test_two_models_alternate_within_the_budget_and_rss_agrees(sizes: dict[str, int]) -> None:
    before = _rss()
    pool = ModelPool(ModelSettings(n_ctx=512), max_memory=sizes[SMOL] + sizes[GEMMA] + (8 << 20))
    try:
        answers = [_answer(pool.get(m), "Name a fruit.") for m in (SMOL, GEMMA, SMOL, GEMMA)]
        assert answers[0] == answers[2] and answers[1] == answers[3]   # each model answers as itself
        assert sorted(pool.loaded) == sorted(pool.resolve(m)[0] for m in (SMOL, GEMMA))
        assert {e["id"]: e["loaded"] for e in pool.catalog()}[pool.resolve(GEMMA)[0]] is True
        # the planner's estimates are not underestimates: what the process grew by stays within them
        assert _rss() - before < 1.15 * (sizes[SMOL] + sizes[GEMMA])
    finally:
        pool.close()


def test_the_least_recently_used_idle_model_makes_room(sizes: dict[str, int]) -> None:
    pool = ModelPool(ModelSettings(n_ctx=512), max_memory=max(sizes.values()) + (8 << 20))
    try:
        smol = pool.resolve(SMOL)[0]
        pool.get(SMOL)
        pool.get(GEMMA)   # does not fit beside SmolLM2: SmolLM2, idle, goes
        assert list(pool.loaded) == [pool.resolve(GEMMA)[0]]
        assert {e["id"]: e["loaded"] for e in pool.catalog()}[smol] is False
        assert pool.used() <= pool.max_memory
    finally:
        pool.close()


def test_a_busy_model_is_not_unloaded_and_the_request_is_told_to_retry(sizes: dict[str, int]) -> None:
    pool = ModelPool(ModelSettings(n_ctx=512), max_memory=max(sizes.values()) + (8 << 20))
    try:
        eng = pool.get(SMOL)
        req = eng.submit(Request(eng.text_ids("Once upon a time"),
                                 SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)))
        next(req.events())   # generating
        with pytest.raises(ServiceUnavailableError) as e:
            pool.get(GEMMA)
        assert e.value.retry_after == 5 and "busy" in str(e.value)
        req.cancel()
        threading.Event().wait(0.5)
        assert pool.get(GEMMA) is not None   # once idle, it makes room
    finally:
        pool.close()


def test_a_model_that_can_never_fit_is_a_400_that_says_how_much(sizes: dict[str, int]) -> None:
    pool = ModelPool(ModelSettings(n_ctx=512), max_memory=sizes[GEMMA] // 2)
    with pytest.raises(ModelTooLargeError) as e:
        pool.get(GEMMA)
    assert e.value.status == 400 and e.value.needed == sizes[GEMMA]
    assert f"{sizes[GEMMA] / 2**20:.0f} MiB" in str(e.value)
    assert pool.loaded == {}


def test_keep_alive_unloads_idle_models(sizes: dict[str, int]) -> None:
    now = [0.0]
    pool = ModelPool(ModelSettings(n_ctx=512), max_memory=1 << 34, keep_alive=30, clock=lambda: now[0])
    try:
        pool.get(SMOL)
        now[0] = 20.0
        pool.get(GEMMA)
        now[0] = 40.0
        assert pool.reap() == [pool.resolve(SMOL)[0]]   # idle 40 s > 30; Gemma only 20 s
        now[0] = 51.0
        assert pool.reap() == [pool.resolve(GEMMA)[0]] and pool.loaded == {}
    finally:
        pool.close()
