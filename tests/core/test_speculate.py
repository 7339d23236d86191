"""Prompt-lookup speculative decoding (localllm/core/speculate.py), on the default model.

Drafts are taken on an answer that copies its prompt, every kept token is the
greedy choice of the model's own logits for the tokens before it (checked by
scoring the whole answer again in one pass), and it stays off where it
cannot apply (sampling, several choices) and by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localllm.converter.verify import gguf_logits
from tests.helpers import ROOT

CODE = (ROOT / "localllm" / "core" / "speculate.py").read_text()[:2500]
COPY = [{"role": "user", "content": "Repeat this Python code exactly, changing nothing.\n\n" + CODE}]


def test_drafts_are_taken_and_every_kept_token_is_greedy(default_model_path: Path) -> None:
    from localllm import Model

    with Model(default_model_path, n_ctx=2048, speculate="on", prompt_cache=False) as m:
        assert m.info.speculate == "on"
        ids = m.chat_tokens(COPY)
        r = m.chat_complete(COPY, temperature=0, max_tokens=96)
        st = m.engine.stats
    assert r.completion_tokens == 96
    # the answer copies the code: a good part of it came from accepted drafts
    assert st["accepted_tokens"] >= 32 and st["drafted_tokens"] >= st["accepted_tokens"]
    logits = gguf_logits(default_model_path, ids + r.tokens)[len(ids) - 1:-1]  # one pass, no localllm core
    chosen = logits[np.arange(len(r.tokens)), r.tokens]
    gap = logits.max(axis=1) - chosen
    # one pass rounds differently from the steps that chose them: a near-tie may go either way
    assert (gap <= 0.5).all(), gap.max()
    assert (gap == 0).mean() >= 0.9


def test_no_drafts_when_they_cannot_apply(default_model_path: Path) -> None:
    from localllm import Model

    with Model(default_model_path, n_ctx=2048, prompt_cache=False) as m:  # off by default
        assert m.info.speculate == "off"
        m.chat_complete(COPY, temperature=0, max_tokens=16)
        assert m.engine.stats["drafted_tokens"] == 0
    with Model(default_model_path, n_ctx=2048, speculate="on", prompt_cache=False) as m:
        m.chat_complete(COPY, temperature=0.7, max_tokens=16, seed=1)       # sampled
        m.chat_complete(COPY, temperature=0, max_tokens=16, n=2, seed=1)   # several choices
        assert m.engine.stats["drafted_tokens"] == 0


@pytest.mark.parametrize("bad", ["auto", "yes", True])
def test_bad_speculate_values_are_refused(bad, default_model_path: Path) -> None:
    from localllm import Model
    from localllm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="speculate must be on or off"):
        Model(default_model_path, speculate=bad)
