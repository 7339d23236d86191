"""Prometheus metrics, one registry per app (no process-global state).

Example:
    >>> m = Metrics()
    >>> m.requests.labels(endpoint="chat", status="200").inc()
    >>> b"localllm_requests_total" in m.render()[0]
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """Counters and histograms for one server."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("localllm_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("localllm_prompt_tokens", "Prompt tokens received", registry=r)
        self.cached_tokens = Counter("localllm_prompt_cached_tokens",
                                     "Prompt tokens served from a slot's KV cache", registry=r)
        self.generated_tokens = Counter("localllm_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("localllm_time_to_first_token_seconds", "Submit to first sampled token",
                              buckets=_LATENCY, registry=r)
        self.token_latency = Histogram("localllm_decode_step_seconds",
                                       "Duration of one batched decode step (per-token latency)",
                                       buckets=_LATENCY, registry=r)
        self.batch_sequences = Histogram("localllm_batch_sequences",
                                         "Sequences decoded together in one decode step (continuous batching)",
                                         buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_depth = Gauge("localllm_queue_depth", "Requests waiting for a slot", registry=r)
        self.busy_slots = Gauge("localllm_busy_slots", "Slots generating", registry=r)
        self.slots = Gauge("localllm_slots", "Slots (--parallel)", registry=r)

    def watch(self, status: Callable[[], Any]) -> None:
        """The queue and slot gauges read ``status()`` (``Engine.status``: an object with
        ``queue_depth``, ``busy_slots`` and ``n_slots``) when scraped."""
        self.queue_depth.set_function(lambda: status().queue_depth)
        self.busy_slots.set_function(lambda: status().busy_slots)
        self.slots.set_function(lambda: status().n_slots)

    def on_step(self, info: dict) -> None:
        """Called by the scheduler after every decode step."""
        if info.get("sequences"):
            self.token_latency.observe(info["seconds"])
            self.batch_sequences.observe(info["sequences"])

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
