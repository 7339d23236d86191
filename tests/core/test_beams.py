"""Beam search against a beam search written here from its definition, on llama.cpp's own
logits (llama-cpp-python's ``Llama``, not our runtime); with a grammar."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from localllm import Model
from tests.helpers import write_tiny_llama
from tests.llama_reference import Reference, log_softmax

llama_cpp = pytest.importorskip("llama_cpp")


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

