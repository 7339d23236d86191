"""Prompt-lookup speculative decoding: no draft model, the context is the draft.

Answers that copy from their input (editing code, summaries, extraction, RAG)
repeat runs of the prompt. After each token, the last few tokens are looked
up in the prompt and the answer so far; the tokens that followed their latest
earlier occurrence are the draft. The token and its draft are decoded in one
batch, and the draft is kept up to the first token greedy decoding would not
have chosen: a single pass can yield several tokens.

It is opt-in (``speculate="on"``): the rows of a batch are not computed
with the kernels of a single token (llama.cpp's CPU matmul of the output
head, flash attention), so their logits differ in the last bits, and a draft
can flip a greedy near-tie that plain decoding would break the other way (as
a batch of concurrent requests can). Every kept token is still the argmax of
logits the model computed for exactly the tokens before it.

Example:
    >>> d = Drafter([5, 6, 7, 8, 9, 5, 6])
    >>> d.draft(3)
    [7, 8, 9]
    >>> d.accept([7, 1])
    >>> d.draft(3)      # "7 1" never occurred before: no draft
    []
"""

from __future__ import annotations

from collections.abc import Sequence

NGRAMS = (3, 2)      # looked up longest first; a single token predicts too little to pay
MAX_DRAFT = 12
MIN_DRAFT = 2


class Drafter:
    """The tokens so far, indexed by their n-grams, and how well drafts do."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in NGRAMS}
        self.k = 4                 # the next draft's length: grows while drafts are taken whole
        self.drafted = self.taken = 0
        self.pause = 0             # tokens to go without drafting after drafts stopped paying
        self.accept(tokens)

    def accept(self, tokens: Sequence[int]) -> None:
        """Append tokens; every n-gram that now has a next token points to it."""
        toks = self.tokens
        for t in tokens:
            at = len(toks)
            for n, idx in self.index.items():
                if at >= n:
                    idx[tuple(toks[at - n:at])] = at   # the latest occurrence wins
            toks.append(int(t))

    def draft(self, k: int | None = None) -> list[int]:
        """Up to ``k`` (default: the adaptive length) tokens that followed the latest earlier
        occurrence of the longest n-gram the tokens end with; [] when none did."""
        if self.pause > 0:
            self.pause -= 1
            return []
        k = self.k if k is None else k
        toks = self.tokens
        for n, idx in self.index.items():
            if len(toks) < n:
                continue
            at = idx.get(tuple(toks[-n:]))
            if at is not None:
                return toks[at:at + k]
        return []

    def record(self, drafted: int, taken: int) -> None:
        """A draft of ``drafted`` tokens of which the first ``taken`` were right: adapt its length,
        and pause after many drafts that did not pay for their rows."""
        self.drafted += drafted
        self.taken += taken
        self.k = min(MAX_DRAFT, self.k + 2) if taken == drafted else max(MIN_DRAFT, taken + 1)
        if self.drafted >= 48 and self.taken < self.drafted // 4:
            self.pause, self.drafted, self.taken = 64, 0, 0
