"""Log-probabilities of tokens: log-softmax of the model's raw logits (before
temperature, penalties or grammar), as OpenAI's ``logprobs`` reports them.

Example:
    >>> import numpy as np
    >>> lp = token_logprob(np.log(np.array([0.5, 0.25, 0.25], dtype=np.float32)), 1, top=2,
    ...                    piece=lambda t: b"ab"[t:t + 1])
    >>> round(lp.logprob, 4), [(t, round(v, 4)) for t, _, v in lp.top]
    (-1.3863, [(0, -0.6931), (1, -1.3863)])
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenLogprob:
    """One generated token: its id, bytes, log-probability and the ``top``
    alternatives (id, bytes, log-probability; most likely first). ``offset`` is
    where its text starts in the choice's text (characters)."""

    token: int
    bytes: bytes
    logprob: float
    top: list[tuple[int, bytes, float]] = field(default_factory=list)
    offset: int = 0

    @property
    def text(self) -> str:
        return self.bytes.decode("utf-8", "replace")


def log_normalizer(x: np.ndarray) -> float:
    """log(sum(exp(x))), computed stably in float64."""
    m = float(x.max())
    return m + float(np.log(np.exp((x - m).astype(np.float64)).sum()))


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) - log_normalizer(x)


def token_logprob(x: np.ndarray, token: int, *, top: int, piece: Callable[[int], bytes],
                  lse: float | None = None) -> TokenLogprob:
    """The log-probability of ``token`` under logits ``x`` and the ``top`` most likely tokens."""
    if lse is None:
        lse = log_normalizer(x)
    alts: list[tuple[int, bytes, float]] = []
    if top > 0:
        k = min(top, x.size)
        idx = np.argpartition(-x, k - 1)[:k]
        idx = idx[np.lexsort((idx, -x[idx]))]  # by logit, then by id for ties
        alts = [(int(i), piece(int(i)), float(x[i]) - lse) for i in idx]
    return TokenLogprob(token=int(token), bytes=piece(int(token)), logprob=float(x[token]) - lse, top=alts)
