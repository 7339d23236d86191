"""KV slots and the lanes that feed the shared batch.

The context's KV cache is partitioned by sequence id, one KV stream per slot
(like ``llama-server -np N``): a sequence's cells stay in position order
whatever the others do, so its arithmetic is the same alone or batched. A
slot keeps its tokens after a request ends, so the next request sharing a
prefix (a chat's next turn) decodes only the new part.

A lane is one sequence being fed: the tokens still to decode into its slot.

Reused KV must give the very numbers a fresh decode would: llama.cpp's
kernels round differently with the number of rows in a micro-batch (flash
attention, repacked Q4 gemm against gemv), so a prefix decoded in other
pieces changes the logits after it and can flip a greedy near-tie. So a
prompt is decoded in *canonical chunks*: it is cut at :func:`cuts`, which
depend only on the tokens before each cut (never on the prompt's length or on
what is cached), and each chunk is decoded alone. A prefix is reused, from
memory or from the prompt cache on disk, only up to a cut, where its KV is
bit for bit what decoding the new prompt from scratch would compute.
Generated tokens (decoded one at a time) and a prompt's tail after its last
cut are never reused.

Example:
    >>> lcp([1, 2, 3, 9], [1, 2, 3, 4, 5])
    3
    >>> lcp([1, 2, 3], [1, 2, 3])     # the last prompt token is always decoded again
    2
    >>> cuts([7] * 40 + [0] + [7] * 100, eog={0}, unit=128)   # after the turn end, then every 128
    [41, 128]
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from localllm import runtime

CHUNK = 512      # canonical chunks are at most this long (and cut at every multiple of it)
MIN_CHUNK = 16   # a turn end this close to the previous cut, or to the next multiple, is not a cut


def cuts(tokens: Sequence[int], *, eog: Collection[int], unit: int = CHUNK) -> list[int]:
    """Where ``tokens`` is cut into canonical chunks, before its last token: every multiple of
    ``unit``, and after each end-of-turn token (so a chat's system prompt and each finished turn
    end on a cut) unless that leaves a chunk shorter than MIN_CHUNK. Each cut depends only on the
    tokens before it: two prompts sharing a prefix share its cuts."""
    out: list[int] = []
    last = 0
    for i in range(1, len(tokens)):
        if i % unit == 0 or (tokens[i - 1] in eog and i - last >= MIN_CHUNK and -i % unit >= MIN_CHUNK):
            out.append(i)
            last = i
    return out


def reuse_point(cached: Sequence[int], exact: int, prompt: Sequence[int], prompt_cuts: Sequence[int],
                held_extra: Sequence[int] = (), extra: Sequence[int] = ()) -> int:
    """How much of a slot holding ``cached`` (canonical up to ``exact``) a new prompt reuses:
    its last cut within the common prefix (0 if none). A caller's ``extra`` cuts (see
    :class:`Request`) must be the ones the slot was decoded with (``held_extra``) below that cut."""
    n = min(lcp(cached, prompt), exact)
    best = 0
    for c in prompt_cuts:
        if c > n or [e for e in held_extra if e < c] != [e for e in extra if e < c]:
            break
        best = c
    return best


class Slot:
    """KV sequence ``seq`` and the tokens whose KV it holds."""

    __slots__ = ("seq", "cached", "exact", "extra", "last_used", "busy")

    def __init__(self, seq: int) -> None:
        self.seq = seq
        self.cached: list[int] = []
        self.exact = 0  # cached[:exact] was decoded in canonical chunks (reusable bit for bit)
        self.extra: tuple[int, ...] = ()  # a caller's own cuts among them (Request.cuts)
        self.last_used = 0.0
        self.busy = False


class Lane:
    """A slot being fed: ``pending`` tokens go in at ``pos``; after a decode,
    ``row`` is the batch row holding the logits of its last token (or -1).
    ``cuts``: the prompt's canonical cuts still ahead of ``pos``. With ``all_rows``
    (a token and its speculative draft) every pending token gets logits, in ``rows``.
    ``prompt_end``: the prompt's length (the lane is reading its prompt while ``pos`` is below it);
    ``ragged``: some of the prompt went in as a piece other than a canonical chunk (``--prefill
    fair``), so nothing from that piece on is reusable."""

    __slots__ = ("slot", "pending", "pos", "row", "fed", "cuts", "all_rows", "rows", "prompt_end", "ragged")

    def __init__(self, slot: Slot) -> None:
        self.slot = slot
        self.pending: list[int] = []
        self.pos = 0
        self.row = -1
        self.fed: list[int] = []
        self.cuts: list[int] = []
        self.all_rows = False
        self.rows: list[int] = []
        self.prompt_end = 0
        self.ragged = False

    def prompting(self) -> bool:
        """Whether the lane has prompt tokens to read (not a generated token or a beam's tail)."""
        return bool(self.pending) and self.pos < self.prompt_end

    def feed_chunk(self, batch: runtime.Batch) -> int:
        """Put the pending tokens up to the next cut into the (empty) batch, no logits; returns how many."""
        n = self.cuts.pop(0) - self.pos
        chunk, self.pending = self.pending[:n], self.pending[n:]
        for j, tok in enumerate(chunk):
            batch.add(tok, self.pos + j, self.slot.seq, False)
        self.pos += n
        self.fed = chunk
        return n

    def feed_piece(self, batch: runtime.Batch, n: int) -> int:
        """Put the next ``n`` pending prompt tokens (fewer if the batch has less room) into the batch
        beside others, whatever the cuts; logits for the prompt's last token if this piece ends it.
        The lane is ragged from here on. Returns how many went in."""
        n = min(n, batch.capacity - batch.n, len(self.pending))
        if n <= 0:
            return 0
        piece, self.pending = self.pending[:n], self.pending[n:]
        r = -1
        for j, tok in enumerate(piece):
            r = batch.add(tok, self.pos + j, self.slot.seq, j == n - 1 and not self.pending)
        if not self.pending:
            self.row = r
            self.rows = [r]
        self.pos += n
        self.cuts = [c for c in self.cuts if c > self.pos]
        self.fed = piece
        self.ragged = True
        return n

    def feed(self, batch: runtime.Batch) -> int:
        """Add as many pending tokens as the batch has room for; logits for the last one. Returns
        how many. (Canonical chunks go first, through :meth:`feed_chunk`.)"""
        room = batch.capacity - batch.n
        if room <= 0 or not self.pending or self.cuts:
            return 0
        if self.all_rows:  # a token and its draft: all in this batch, or the token alone
            if room < len(self.pending):
                del self.pending[1:]
            self.all_rows = False
            self.rows = [batch.add(t, self.pos + j, self.slot.seq, True) for j, t in enumerate(self.pending)]
            self.row = self.rows[-1]
            self.pos += len(self.pending)
            self.fed, self.pending = self.pending, []
            return len(self.fed)
        if len(self.pending) == 1:  # the common case: one generated token
            self.row = batch.add(self.pending[0], self.pos, self.slot.seq, True)
            self.rows = [self.row]
            self.fed, self.pending = self.pending, []
            self.pos += 1
            return 1
        chunk, self.pending = self.pending[:room], self.pending[room:]
        seq, pos, last = self.slot.seq, self.pos, len(chunk) - 1
        r = -1
        for j, tok in enumerate(chunk):
            r = batch.add(tok, pos + j, seq, j == last and not self.pending)
        if not self.pending:
            self.row = r
            self.rows = [r]
        self.pos += len(chunk)
        self.fed = chunk
        return len(chunk)

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
    slot.exact = min(slot.exact, keep)
    return keep


def start(ctx: runtime.Context, lane: Lane, prompt: list[int], prompt_cuts: list[int],
          extra: Sequence[int] = ()) -> int:
    """Point ``lane`` at ``prompt``, reusing its slot's cached prefix up to a cut; returns the reused length."""
    slot = lane.slot
    keep = truncate(ctx, slot, reuse_point(slot.cached, slot.exact, prompt, prompt_cuts, slot.extra, extra))
    slot.extra = tuple(extra)
    lane.pending = prompt[keep:]
    lane.pos = keep
    lane.row = -1
    lane.cuts = [c for c in prompt_cuts if c > keep]
    lane.prompt_end = len(prompt)
    lane.ragged = False
    return keep


def copy(ctx: runtime.Context, src: Lane, dst: Lane) -> None:
    """Make ``dst``'s slot hold what ``src``'s holds (a whole-stream copy) and share its logits row."""
    ctx.seq_rm(dst.slot.seq, -1, -1)
    ctx.seq_cp(src.slot.seq, dst.slot.seq, -1, -1)
    dst.slot.cached = list(src.slot.cached)
    dst.slot.exact = src.slot.exact
    dst.slot.extra = src.slot.extra
    dst.pos = src.pos
    dst.row = src.row
    dst.pending = []
