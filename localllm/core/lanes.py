"""KV slots and the lanes that feed the shared batch.

The context's KV cache is partitioned by sequence id, one KV stream per slot
(like ``llama-server -np N``): a sequence's cells stay in position order
whatever the others do, so its arithmetic is the same alone or batched. A
slot keeps its tokens after a request ends, so the next request sharing a
prefix (a chat's next turn) decodes only the new part.

A lane is one sequence being fed: the tokens still to decode into its slot.

Example:
    >>> lcp([1, 2, 3, 9], [1, 2, 3, 4, 5])
    3
    >>> lcp([1, 2, 3], [1, 2, 3])     # the last prompt token is always decoded again
    2
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localllm import runtime


class Slot:
    """KV sequence ``seq`` and the tokens whose KV it holds."""

    __slots__ = ("seq", "cached", "last_used", "busy")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []
        self.last_used = 0.0
        self.busy = False


class Lane:
    """A slot being fed: ``pending`` tokens go in at ``pos``; after a decode,
    ``row`` is the batch row holding the logits of its last token (or -1)."""

    __slots__ = ("slot", "pending", "pos", "row", "fed")

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.pending: list[int] = []
        self.pos = 0
        self.row = -1
        self.fed: list[int] = []

    def feed(self, batch: runtime.Batch) -> None:
        """Add as many pending tokens as the batch has room for; logits for the last one."""
        room = batch.capacity - batch.n
        if room <= 0 or not self.pending:
            return
        if len(self.pending) == 1:  # the common case: one generated token
            self.row = batch.add(self.pending[0], self.pos, self.slot.seq, True)
            self.fed, self.pending = self.pending, []
            self.pos += 1
            return
        chunk, self.pending = self.pending[:room], self.pending[room:]
        seq, pos, last = self.slot.seq, self.pos, len(chunk) - 1
        r = -1
        for j, tok in enumerate(chunk):
            r = batch.add(tok, pos + j, seq, j == last and not self.pending)
        if not self.pending:
            self.row = r
        self.pos += len(chunk)
        self.fed = chunk

    def decoded(self) -> None:
        """The fed tokens are in the KV cache now."""
        if self.fed:
            self.slot.cached.extend(self.fed)
            self.fed = []


def lcp(cached: Sequence[int], prompt: Sequence[int]) -> int:
    """Longest common prefix of what a slot holds and a prompt, short of the
    prompt's last token (decoded again for fresh logits)."""
    n = 0
    for a, b in zip(cached, prompt[:-1]):
        if a != b:
            break
        n += 1
    return n


def truncate(ctx: runtime.Context, slot: Slot, keep: int) -> int:
    """Keep the first ``keep`` cached tokens of ``slot``; returns what was kept
    (0 when this memory cannot drop a suffix, as a recurrent model's cannot)."""
    keep = min(keep, len(slot.cached))
    if keep < len(slot.cached) and not ctx.seq_rm(slot.seq, keep, -1):
        keep = 0
    if keep == 0:
        ctx.seq_rm(slot.seq, -1, -1)
    del slot.cached[keep:]
    return keep


def start(ctx: runtime.Context, lane: Lane, prompt: list[int]) -> int:
    """Point ``lane`` at ``prompt``, reusing its slot's cached prefix; returns the reused length."""
    keep = truncate(ctx, lane.slot, lcp(lane.slot.cached, prompt))
    lane.pending = prompt[keep:]
    lane.pos = keep
    lane.row = -1
    return keep


def copy(ctx: runtime.Context, src: Lane, dst: Lane) -> None:
    """Make ``dst``'s slot hold what ``src``'s holds (a whole-stream copy) and share its logits row."""
    ctx.seq_rm(dst.slot.seq, -1, -1)
    ctx.seq_cp(src.slot.seq, dst.slot.seq, -1, -1)
    dst.slot.cached = list(src.slot.cached)
    dst.pos = src.pos
    dst.row = src.row
    dst.pending = []
