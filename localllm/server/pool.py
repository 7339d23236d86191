"""Many models behind one server: loaded on first use, within a memory budget.

A request names a model by ``name[:version]`` (a store reference). The pool
loads it on first use, after the planner's estimate (weights, KV cache and
compute buffers, :func:`localllm.plan.make_plan`) says it fits in
``max_memory`` beside the models already loaded; to make room it unloads the
least recently used *idle* model. A model that can never fit is a 400 that
says how much it needs; one that must wait for a busy model to finish is a 503
with Retry-After. ``keep_alive`` unloads models idle for that long.

Example:
    >>> pool = ModelPool(ModelSettings(n_ctx=1024), max_memory=4 << 30)        # doctest: +SKIP
    >>> pool.get("gemma3-270m").info.id                                          # doctest: +SKIP
    'gemma3-270m:q4_k_m'
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from localllm.errors import ModelNotFoundError, ModelTooLargeError, ServiceUnavailableError
from localllm.loader import ModelSettings

log = logging.getLogger("localllm.server")


@dataclasses.dataclass
class _Entry:
    engine: Any
    need: int               # the planner's estimate, bytes
    last_used: float


class ModelPool:
    """Engines by store reference. Thread-safe; loading happens in the requesting thread."""

    def __init__(self, base: ModelSettings, *, max_memory: int, keep_alive: float | None = None,
                 max_queue: int = 16, on_step: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, models_dir: str | None = None) -> None:
        self.base, self.max_memory, self.keep_alive = base, max_memory, keep_alive
        self.models_dir = models_dir
        self.max_queue, self.on_step, self.clock = max_queue, on_step, clock
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loaded: dict[str, _Entry] = {}

    # ------------------------------------------------------------------ what exists
    def catalog(self) -> list[dict[str, Any]]:
        """Every model in the store, and whether (and how recently) it is loaded."""
        from localllm import settings, store

        with self._lock:
            loaded = dict(self.loaded)
        out = []
        for e in store.list_models(settings.models_dir(self.models_dir)):
            ref = e["ref"]
            out.append({"id": ref, "loaded": ref in loaded, "default": bool(e.get("default")),
                        "size": e.get("size"), "quant": e.get("quant")})
        return out

    def resolve(self, name: str | None) -> tuple[str, Any]:
        """(the store reference ``NAME:VERSION``, its path) for a request's ``model``."""
        from localllm import loader, resolve

        path = resolve.resolve(name or None, models_dir=self.models_dir)
        ref = loader.model_id(path)
        if ":" not in ref:  # a file outside the store: pools serve the store
            raise ModelNotFoundError(f"model {name!r} is not in the store", param="model",
                                     hint="run `localllm models list`")
        return ref, path

    def used(self) -> int:
        with self._lock:
            return sum(e.need for e in self.loaded.values())

    # ------------------------------------------------------------------ loading
    def get(self, name: str | None) -> Any:
        """The engine for ``name`` (loaded now if it is not)."""
        ref, path = self.resolve(name)
        with self._lock:
            e = self.loaded.get(ref)
            if e is not None:
                e.last_used = self.clock()
                return e.engine
            gate = self._loading.setdefault(ref, threading.Lock())
        with gate:  # one load per model; a second request waits for it
            with self._lock:
                e = self.loaded.get(ref)
                if e is not None:
                    e.last_used = self.clock()
                    return e.engine
            prep = self._prepare(path)
            need = self._estimate(prep)
            self._make_room(ref, need)
            eng = self._load(prep)
            with self._lock:
                self.loaded[ref] = _Entry(eng, need, self.clock())
            log.info("model %s loaded (%.0f MiB planned; %.0f of %.0f MiB in use)", ref, need / 2**20,
                     self.used() / 2**20, self.max_memory / 2**20)
            return eng

    def _prepare(self, path: Any) -> Any:
        """``path`` with the pool's settings, its header read and layers placed once (loader.prepare):
        the plan and the load below both take it."""
        from localllm import loader

        return loader.prepare(dataclasses.replace(self.base, model=str(path)))

    def plan(self, path: Any, prepared: Any = None) -> Any:
        """The plan of loading ``path`` with the pool's settings: ModelSettings.plan, the same layout
        (mapped or read, the whole context of every sequence) that ``serve`` of one model plans and loads."""
        prep = prepared or self._prepare(path)
        return prep.settings.plan(prep.header)

    def _estimate(self, prepared: Any) -> int:
        p = self.plan(prepared.path, prepared)
        return int(p.ram_bytes or p.total_bytes)

    def _make_room(self, ref: str, need: int) -> None:
        if need > self.max_memory:
            raise ModelTooLargeError(
                f"model {ref} needs about {need / 2**20:.0f} MiB, more than this server's memory budget "
                f"({self.max_memory / 2**20:.0f} MiB, --max-memory)", hint="use a smaller quant or context",
                param="model", needed=need)
        while True:
            with self._lock:
                free = self.max_memory - sum(e.need for e in self.loaded.values())
                if need <= free:
                    return
                idle = [(e.last_used, r) for r, e in self.loaded.items() if _idle(e.engine)]
                if not idle:
                    raise ServiceUnavailableError(
                        f"model {ref} needs about {need / 2**20:.0f} MiB and the loaded models are busy; "
                        "retry shortly", retry_after=5)
                victim = min(idle)[1]
                entry = self.loaded.pop(victim)
            log.info("unloading %s to make room for %s", victim, ref)
            entry.engine.close()

    def _load(self, prepared: Any) -> Any:
        from localllm.core.engine import Engine

        eng = Engine(prepared.settings, threaded=True, max_queue=self.max_queue, on_step=self.on_step,
                     prepared=prepared)
        for note in eng.notes:
            log.warning("%s", note)
        return eng

    # ------------------------------------------------------------------ unloading
    def reap(self) -> list[str]:
        """Unload the models idle for longer than ``keep_alive``; returns their references."""
        if self.keep_alive is None:
            return []
        now = self.clock()
        with self._lock:
            gone = [r for r, e in self.loaded.items() if now - e.last_used > self.keep_alive and _idle(e.engine)]
            entries = [self.loaded.pop(r) for r in gone]
        for r, e in zip(gone, entries):
            log.info("unloading %s: idle for more than %g s", r, self.keep_alive)
            e.engine.close()
        return gone

    def start_reaper(self, every: float = 1.0) -> threading.Event:
        """Run :meth:`reap` on a daemon thread until the returned event is set."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.reap()
                except Exception:  # an unload that fails must not stop the next ones
                    log.exception("unloading an idle model failed")

        threading.Thread(target=loop, name="localllm-keep-alive", daemon=True).start()
        return stop

    def close(self) -> None:
        with self._lock:
            entries, self.loaded = list(self.loaded.values()), {}
        for e in entries:
            e.engine.close()


def _idle(engine: Any) -> bool:
    return bool(engine.status().idle)


__all__ = ["ModelPool"]
