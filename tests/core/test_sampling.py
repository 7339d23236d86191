"""The generation core against independent references: llama.cpp's own logits
(llama-cpp-python's ``Llama``, not our runtime) with the arithmetic redone in
numpy, and a beam search written here from its definition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localllm import Model
from ggufs import write_tiny_llama

llama_cpp = pytest.importorskip("llama_cpp")


class Reference:
    """Logits of any token sequence, from llama-cpp-python's high-level ``Llama``."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        # flash attention on, as llama.cpp's "auto" chooses on a CPU (our runtime's setting)
        self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=2,
                                   logits_all=True, flash_attn=True, verbose=False)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Last-position logits, decoding the prefix shared with the previous call only once."""
        llm = self.llm
        keep = 0
        for a, b in zip(llm.input_ids[:llm.n_tokens], tokens[:-1]):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)

    def close(self) -> None:
        self.llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))


@pytest.fixture(scope="module")
def ref(default_model_path: Path):
    r = Reference(default_model_path, 512)
    yield r
    r.close()


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
    prompt = model._chat_ids(msgs)
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


# ---------------------------------------------------------------- beam search

def reference_beam_search(ref: Reference, prompt: list[int], k: int, max_tokens: int,
                          eog: set[int]) -> list[int]:
    """Beam search from its definition: keep the K best continuations by summed
    log-probability; an end token among the K best candidates finishes a hypothesis;
    stop at K finished or the length limit; best = highest score / length."""
    alive: list[tuple[list[int], float]] = [([], 0.0)]
    done: list[tuple[list[int], float]] = []
    for step in range(max_tokens):
        cands = []
        for b, (toks, score) in enumerate(alive):
            lp = log_softmax(ref.logits(prompt + toks))
            for t in np.argsort(-lp, kind="stable")[:k + 1]:
                cands.append((score + lp[t], b, int(t)))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        nxt = []
        for rank, (s, b, t) in enumerate(cands):
            if t in eog:
                if rank < k:
                    done.append((alive[b][0], s))
                continue
            nxt.append((alive[b][0] + [t], s))
            if len(nxt) == k:
                break
        if len(done) >= k or not nxt:
            break
        if step + 1 == max_tokens:
            done.extend(nxt)
            break
        alive = nxt
    return max(done or alive, key=lambda d: d[1] / max(len(d[0]), 1))[0]


@pytest.fixture(scope="module")
def peaked_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("beam") / "peaked.gguf", scale=0.6, seed=3)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_beam_search_matches_a_reference(peaked_tiny: Path, k: int) -> None:
    r = Reference(peaked_tiny, 256)
    try:
        with Model(peaked_tiny, n_ctx=256) as m:
            for text in ("the cat", "hello world and", "a dog ran on the"):
                prompt = m.tokenize(text)
                got = m.complete(text, num_beams=k, max_tokens=10)
                want = reference_beam_search(r, prompt, k, 10, {2})
                assert got.tokens == want, (text, k)
                greedy = m.complete(text, temperature=0, max_tokens=10).tokens
                assert reference_beam_search(r, prompt, 1, 10, {2}) == greedy
            # beams that differ from greedy somewhere: the search is not a no-op
            assert any(m.complete(t, num_beams=k, max_tokens=10).tokens
                       != m.complete(t, temperature=0, max_tokens=10).tokens
                       for t in ("the cat", "hello world and", "a dog ran on the", "sat on", "the mat"))
    finally:
        r.close()


def test_beam_search_on_the_default_model(model: Model, ref: Reference) -> None:
    vocab = llama_cpp.llama_model_get_vocab(ref.llm.model)
    eog = {t for t in range(ref.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)}
    for text in ("The capital of France is", "1, 2, 3,"):
        got = model.complete(text, num_beams=3, max_tokens=8)
        assert got.tokens == reference_beam_search(ref, model.tokenize(text), 3, 8, eog)


def test_beam_search_honours_a_grammar(model: Model) -> None:
    r = model.complete("Is the sky blue? Answer:", num_beams=3, max_tokens=8, grammar='root ::= " yes" | " no"')
    assert r.text in (" yes", " no") and r.finish_reason == "stop"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    import json

    r = model.complete("A JSON object with a number:", num_beams=2, max_tokens=24, json_schema=schema)
    assert isinstance(json.loads(r.text)["n"], int)
