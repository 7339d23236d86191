"""A pool (``serve --all-models``) and a single ``serve`` of the same model under the same settings plan and
load the same layout: the weights mapped or read into memory by the one auto rule (plan.weights_mapped, through
ModelSettings.plan), with the whole context of every sequence counted. Before, the pool's estimate read the
weights wherever huge pages exist while loading mapped a model that would not fit held in RAM."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest


def test_pool_and_single_serve_plan_and_load_one_layout(default_model_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import hardware, plan, validate
    from localllm.loader import ModelSettings
    from localllm.server import ServerSettings, create_app, shutdown
    from localllm.server.pool import ModelPool

    base = ModelSettings(n_ctx=512, n_seq=2, prompt_cache=False)
    h = validate.read_header(default_model_path)
    held = plan.estimate(h, 1024, n_seq=2, mmap=False).ram_bytes   # read into memory, both sequences
    real = hardware.memory()
    # RAM enough to hold it, then too little: mapped exactly when it would not fit (and huge pages exist)
    for available, mapped in ((held * 4, not hardware.weights_in_memory()), (held // 2, True)):
        monkeypatch.setattr(hardware, "memory", lambda available=available: {**real, "available": available})
        settings = dataclasses.replace(base, model=str(default_model_path))
        planned_single = settings.plan(h)                       # what `localllm plan` shows for these settings
        pool = ModelPool(base, max_memory=1 << 40)
        planned_pool = pool.plan(default_model_path)
        app = create_app(ServerSettings(model=settings, load_async=False))
        try:
            single = app.extensions["localllm"].engine.info
            pooled = pool.get(str(default_model_path)).info
            assert (planned_single.mmap, planned_pool.mmap, single.mmap, pooled.mmap) == (mapped,) * 4, available
            assert planned_pool.ram_bytes == planned_single.ram_bytes
            assert planned_pool.n_ctx == planned_single.n_ctx == 1024   # 2 sequences × 512
        finally:
            pool.close()
            shutdown(app)


def test_serve_resolves_reads_and_places_once(default_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` checks the model before it starts (a bad name fails at once) and loads it in the background
    from that same preparation: the name is resolved, the header read and the layers placed once each."""
    from localllm import placement, resolve, validate
    from localllm.server import ServerSettings, create_app, shutdown

    calls = {"resolve": 0, "read_header": 0, "explain": 0}
    for mod, name in ((resolve, "resolve"), (validate, "read_header"), (placement, "explain")):
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(mod, name, counted)
    app = create_app(ServerSettings.create(model="smollm2-135m", ctx=512, prompt_cache=False, load_async=False))
    try:
        assert app.extensions["localllm"].engine.info.path == str(default_model_path)
        assert calls == {"resolve": 1, "read_header": 1, "explain": 1}, calls
    finally:
        shutdown(app)


def test_the_pool_reads_and_places_once_per_load(default_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The pool plans a model (to make room) and loads it from one preparation: one header read."""
    from localllm import validate
    from localllm.loader import ModelSettings
    from localllm.server.pool import ModelPool

    reads = []
    real = validate.read_header
    monkeypatch.setattr(validate, "read_header", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    pool = ModelPool(ModelSettings(n_ctx=512, prompt_cache=False), max_memory=1 << 40)
    try:
        assert pool.get(str(default_model_path)).info.path == str(default_model_path)
        assert len(reads) == 1, reads
    finally:
        pool.close()
