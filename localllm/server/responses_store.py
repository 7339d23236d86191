"""The Responses API's memory: finished responses kept by id (a bounded count, a bounded age, the
oldest evicted first) so that ``previous_response_id`` can continue a conversation.

Example:
    >>> s = ResponseStore(max_count=2, max_age=60.0)
    >>> for rid in ("resp_a", "resp_b", "resp_c"):
    ...     s.put(rid, Stored(messages=[], response={"id": rid}))
    >>> (s.get("resp_a"), s.get("resp_c").response["id"], len(s))
    (None, 'resp_c', 2)
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass
class Stored:
    """One kept response: the conversation it ends (``instructions`` not included: they are not carried
    over, as OpenAI's are not) and the response object that ``GET /v1/responses/{id}`` returns."""

    messages: list[dict[str, Any]]
    response: dict[str, Any]
    at: float = 0.0


class ResponseStore:
    """At most ``max_count`` responses, each for at most ``max_age`` seconds; thread-safe.
    A read refreshes nothing: the oldest stored goes first (a conversation continued gets a new id)."""

    def __init__(self, max_count: int, max_age: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_count = max_count
        self.max_age = max_age
        self._clock = clock
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)

    def _expire(self) -> None:
        cutoff = self._clock() - self.max_age
        while self._items:
            rid, first = next(iter(self._items.items()))
            if first.at > cutoff:
                return
            del self._items[rid]

    def put(self, rid: str, item: Stored) -> None:
        if self.max_count <= 0:
            return
        with self._lock:
            item.at = self._clock()
            self._items[rid] = item
            self._items.move_to_end(rid)
            self._expire()
            while len(self._items) > self.max_count:
                self._items.popitem(last=False)

    def get(self, rid: str) -> Stored | None:
        with self._lock:
            self._expire()
            return self._items.get(rid)

    def delete(self, rid: str) -> bool:
        with self._lock:
            self._expire()
            return self._items.pop(rid, None) is not None
