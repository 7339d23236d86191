"""Between the KV slots and the prompt cache on disk: restore a slot from it, save a slot to it.

The scheduler restores a starting request's slot from the longest cached
prefix it does not already hold, and saves a slot when it holds exactly a
prompt's canonical chunks (see :mod:`localllm.core.lanes`); nothing else is
ever saved, so a restored prefix is bit for bit a fresh decode.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from localllm.core import lanes as lanes_mod
from localllm.errors import LocalLLMError

if TYPE_CHECKING:
    from localllm import runtime
    from localllm.core.lanes import Slot
    from localllm.core.prompt_cache import PromptCache

log = logging.getLogger("localllm.core")


def restore(pc: PromptCache, ctx: runtime.Context, slot: Slot, prompt: list[int], prompt_cuts: list[int]) -> None:
    """Load the cached state sharing the longest prefix with ``prompt`` into ``slot``, when
    the disk has more of it than the slot. A state llama.cpp will not read is deleted."""
    try:
        have = lanes_mod.reuse_point(slot.cached, slot.exact, prompt, prompt_cuts)
        entry = pc.lookup(prompt, have=have)
        blob = pc.load(entry) if entry is not None else None
    except OSError as e:
        log.warning("prompt cache: lookup failed (%s)", e)
        return
    if entry is None or blob is None:
        return
    if ctx.set_seq_state(slot.seq, blob):
        slot.cached = list(entry.tokens)
        slot.exact = len(entry.tokens)  # entries are saved at a cut (see save)
        slot.extra = ()
    else:
        slot.cached, slot.exact = [], 0  # set_seq_state left the sequence empty
        pc.refuse(entry, "llama.cpp could not read its state")


def save(pc: PromptCache, ctx: runtime.Context, slot: Slot) -> None:
    """Save ``slot``'s KV state for later requests and processes. Call it only when the slot holds
    exactly a prompt's canonical chunks, each decoded alone (its tail and answer, or a prompt read
    in other pieces, would not be reusable bit for bit)."""
    if slot.extra or slot.exact != len(slot.cached) or not pc.wants(slot.cached):  # wants: long and new enough
        return
    try:
        pc.save_later(list(slot.cached), ctx.seq_state(slot.seq))
    except (OSError, LocalLLMError) as e:
        log.warning("prompt cache: could not save (%s)", e)
