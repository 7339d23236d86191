"""Beam search over a multi-sequence llama.cpp context.

``K`` beams live in ``K`` sequence ids that share the prompt's KV cells
(``seq_cp``); ``K`` more ids are scratch space to reorder beams after each
step without re-decoding anything. Scores are summed log-probabilities,
compared length-normalised. ``num_beams=1`` is exactly greedy decoding.

Example:
    >>> toks, reason = beam_search(ctx, model, prompt_ids, num_beams=4, max_tokens=16)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from localllm import runtime


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = float(x.max())
    return x - m - np.log(np.exp(x - m, dtype=np.float64).sum())


def beam_search(ctx: runtime.Context, model: runtime.LlamaModel, prompt: Sequence[int], *, num_beams: int,
                max_tokens: int, seq_ids: Sequence[int] | None = None, n_ctx: int | None = None,
                start_pos: int = 0, should_stop: Callable[[], bool] | None = None) -> tuple[list[int], str]:
    """Decode ``prompt[start_pos:]`` into ``seq_ids[0]`` (its first ``start_pos``
    tokens already in that sequence's KV), then beam-search up to ``max_tokens``.
    Returns the best hypothesis's tokens and "stop" or "length". Uses
    ``2 * num_beams`` sequence ids (default ``0 .. 2K-1``) and leaves only the
    prompt in ``seq_ids[0]``. ``should_stop`` is polled every step (a client that
    went away, a server shutting down): the best hypothesis so far is returned.

    Example:
        >>> beam_search(ctx, m, ids, num_beams=1, max_tokens=8)   # doctest: +SKIP
        ([330, 1460, ...], 'length')
    """
    k = num_beams
    ids = list(seq_ids) if seq_ids is not None else list(range(2 * k))
    beams, scratch = ids[:k], ids[k:2 * k]
    limit = n_ctx or ctx.n_ctx
    batch = runtime.Batch(max(ctx.n_batch, k), 1)
    try:
        pos = start_pos
        todo = list(prompt[start_pos:])
        row = -1
        for start in range(0, len(todo), batch.capacity):
            chunk = todo[start:start + batch.capacity]
            batch.clear()
            for j, tok in enumerate(chunk):
                row = batch.add(tok, pos + j, beams[0], start + j == len(todo) - 1)
            ctx.decode(batch)
            pos += len(chunk)
        plen = pos
        for s in beams[1:]:
            ctx.seq_rm(s, -1, -1)
            ctx.seq_cp(beams[0], s, -1, -1)
        # alive hypotheses: (tokens, summed logprob); the first step expands one row only
        alive: list[tuple[list[int], float]] = [([], 0.0)]
        rows = [row]
        done: list[tuple[list[int], float, str]] = []
        eog = model._eog
        for step in range(max_tokens):
            if should_stop is not None and should_stop():
                break
            cands: list[tuple[float, int, int]] = []  # (score, parent beam, token)
            for b, (toks, score) in enumerate(alive):
                lp = _log_softmax(ctx.logits(rows[b]))
                top = np.argpartition(-lp, k)[:k + 1] if lp.size > k + 1 else np.arange(lp.size)
                for t in top:
                    cands.append((score + float(lp[t]), b, int(t)))
            cands.sort(key=lambda c: (-c[0], c[1], c[2]))
            nxt: list[tuple[int, int, float]] = []
            for rank, (score, b, t) in enumerate(cands):
                if eog[t]:
                    if rank < k:  # an end among the K best candidates finishes a hypothesis
                        done.append((alive[b][0], score, "stop"))
                    continue
                nxt.append((b, t, score))
                if len(nxt) == k:
                    break
            if len(done) >= k or not nxt:  # early stopping: K finished hypotheses
                break
            if step == max_tokens - 1 or plen + step + 1 >= limit:
                for b, t, s in nxt:
                    done.append((alive[b][0] + [t], s, "length"))
                break
            # reorder KV: new beam j continues parent b; copy through scratch so no parent is lost
            for j, (b, _, _) in enumerate(nxt):
                ctx.seq_rm(scratch[j], -1, -1)
                ctx.seq_cp(beams[b], scratch[j], -1, -1)
            for j in range(len(nxt)):
                ctx.seq_rm(beams[j], -1, -1)
                ctx.seq_cp(scratch[j], beams[j], -1, -1)
                ctx.seq_rm(scratch[j], -1, -1)
            for j in range(len(nxt), k):
                ctx.seq_rm(beams[j], -1, -1)
            alive = [(alive[b][0] + [t], s) for b, t, s in nxt]
            batch.clear()
            rows = [batch.add(toks[-1], plen + step, beams[j], True) for j, (toks, _) in enumerate(alive)]
            ctx.decode(batch)
        else:
            for toks, s in alive:
                done.append((toks, s, "length"))
        if not done:
            done = [(toks, s, "length") for toks, s in alive]
        best = max(done, key=lambda d: d[1] / max(len(d[0]), 1))
        return best[0], best[2]
    finally:
        for s in beams[1:] + scratch:
            ctx.seq_rm(s, -1, -1)
        ctx.seq_rm(beams[0], plen if "plen" in locals() else 0, -1)
        batch.close()
