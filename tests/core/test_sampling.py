"""Sampling: seeded runs repeat, bad values are refused, and the numbers match independent
references: llama.cpp's own logits (llama-cpp-python's ``Llama``, not our runtime) with the
arithmetic redone in numpy (log-probabilities, penalties, ``best_of``)."""

from __future__ import annotations

import numpy as np
import pytest

from localllm import Model
from localllm.errors import InvalidArgumentError
from tests.llama_reference import Reference, log_softmax

pytest.importorskip("llama_cpp")


def test_seeded_sampling_is_reproducible(model: Model) -> None:
    a = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    b = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    c = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=43)
    assert a == b
    assert a != c


def test_bad_sampling_values(model: Model) -> None:
    for kw in ({"max_tokens": 0}, {"max_tokens": -1}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
               {"min_p": 2}, {"top_k": -1}, {"repeat_penalty": 0}, {"stop": [1]}, {"temperature": float("nan")},
               {"seed": "x"}):
        with pytest.raises(InvalidArgumentError):
            model.generate("hi", **kw)
    model.generate("hi", max_tokens=1)  # the lock was released after each error


@pytest.mark.parametrize("kw", [dict(temperature=0), dict(temperature=1.0, seed=11, top_k=0, top_p=1.0, min_p=0.0)])
def test_logprobs_are_log_softmax_of_llamacpp_logits(model: Model, ref: Reference, kw: dict) -> None:
    r = model.complete("The three primary colours are", max_tokens=12, logprobs=True, top_logprobs=5, **kw)
    prompt = model.tokenize("The three primary colours are")
    assert len(r.logprobs) == len(r.tokens) == r.completion_tokens > 0
    for i, lp in enumerate(r.logprobs):
        expect = log_softmax(ref.logits(prompt + r.tokens[:i]))
        assert lp.token == r.tokens[i]
        assert abs(lp.logprob - expect[lp.token]) < 1e-4, (i, lp.logprob, expect[lp.token])
        order = np.argsort(-expect, kind="stable")[:5]
        assert [t for t, _, _ in lp.top] == [int(t) for t in order]
        assert np.allclose([v for _, _, v in lp.top], expect[order], atol=1e-4)
    if kw["temperature"] == 0:  # greedy takes the most likely token every time
        assert all(lp.token == lp.top[0][0] for lp in r.logprobs)


def test_penalties_follow_llamacpps_formula(model: Model, ref: Reference) -> None:
    """Greedy with repeat/presence/frequency penalties equals argmax of the logits
    penalised as llama.cpp's penalty sampler does, over the last 64 tokens (prompt included)."""
    text = "one two one two one two one two"
    kw = dict(repeat_penalty=1.3, presence_penalty=0.7, frequency_penalty=0.4, repeat_last_n=64)
    r = model.complete(text, max_tokens=12, temperature=0, **kw)
    plain = model.complete(text, max_tokens=12, temperature=0)
    assert r.tokens != plain.tokens  # the penalties change the answer on this prompt
    seq = model.tokenize(text)
    for tok in r.tokens:
        x = ref.logits(seq).astype(np.float32)
        window = seq[-64:]
        for t in set(window):
            c = window.count(t)
            x[t] = x[t] * kw["repeat_penalty"] if x[t] <= 0 else x[t] / kw["repeat_penalty"]
            x[t] -= c * kw["frequency_penalty"] + kw["presence_penalty"]
        assert tok == int(np.argmax(x))
        seq = seq + [tok]


def test_best_of_keeps_the_best_mean_logprob(model: Model, ref: Reference) -> None:
    """Candidates of different lengths, so that the mean and the sum rank them differently.
    A candidate that ended is scored with its end token too (from llama.cpp's logits here)."""
    msgs = [{"role": "user", "content": "Name one animal, in one word."}]
    kw = dict(max_tokens=24, temperature=1.3, seed=5, logprobs=True)
    every = model.chat_complete(msgs, n=5, **kw).choices
    prompt = model.chat_tokens(msgs)
    scores = []
    for c in every:
        lps = [lp.logprob for lp in c.logprobs]
        if c.stop_token is not None:
            lps.append(log_softmax(ref.logits(prompt + c.tokens))[c.stop_token])
        scores.append(lps)
    means = [sum(x) / len(x) for x in scores]
    sums = [sum(x) for x in scores]
    assert len({len(c.tokens) for c in every}) > 1 and any(c.stop_token is not None for c in every)
    by_mean = sorted(range(5), key=lambda i: -means[i])[:2]
    assert by_mean != sorted(range(5), key=lambda i: -sums[i])[:2]  # the seeds make the two rules disagree
    best = model.chat_complete(msgs, n=2, best_of=5, **kw).choices
    assert [c.text for c in best] == [every[i].text for i in by_mean]

