"""Reranking (``/v1/rerank``, ``/rerank``: llama-server's and Jina's shape) and ``Model.rerank`` with a
tiny BERT cross-encoder GGUF written here (bge-reranker's layout, random weights). The reference is a
numpy forward pass of the same weights (BERT, then the ``cls`` + ``cls.output`` head on the first
token, as llama.cpp's RANK pooling computes it) on the pair llama-server builds:
``[BOS] query [EOS] document [EOS]``."""

from __future__ import annotations

import numpy as np
import pytest

from localllm import Model
from localllm.errors import InvalidArgumentError
from tests.helpers import write_tiny_bert_reranker
from tests.serverutil import live_server, post

N_HEAD = 4
QUERY = "the cat sat on the mat"
DOCS = ["a dog ran", "the cat sat", "hello world", "the mat and the cat"]


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    return write_tiny_bert_reranker(tmp_path_factory.mktemp("rerank") / "tiny-reranker.gguf", n_head=N_HEAD)


@pytest.fixture(scope="module")
def server(reranker):
    with live_server(model=str(reranker[0]), parallel=1, ctx=128, prompt_cache=False) as live:
        yield live


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-12) * g + b


def _gelu(x: np.ndarray) -> np.ndarray:  # ggml's: the tanh approximation
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def reference_score(w: dict, ids: list[int]) -> float:
    """BERT (post-norm, GELU, no mask within one sequence) and the classifier head on token 0."""
    x = w["token_embd.weight"][ids] + w["token_types.weight"][0] + w["position_embd.weight"][:len(ids)]
    x = _ln(x, w["token_embd_norm.weight"], w["token_embd_norm.bias"])
    n, d = x.shape
    hd = d // N_HEAD
    layers = sum(k.endswith("ffn_up.weight") for k in w)
    for i in range(layers):
        def lin(name: str, v: np.ndarray) -> np.ndarray:
            return v @ w[f"blk.{i}.{name}.weight"].T + w[f"blk.{i}.{name}.bias"]
        q, k, v = (lin(nm, x).reshape(n, N_HEAD, hd).transpose(1, 0, 2) for nm in ("attn_q", "attn_k", "attn_v"))
        a = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = lin("attn_output", (a @ v).transpose(1, 0, 2).reshape(n, d))
        x = _ln(o + x, w[f"blk.{i}.attn_output_norm.weight"], w[f"blk.{i}.attn_output_norm.bias"])
        f = lin("ffn_down", _gelu(lin("ffn_up", x)))
        x = _ln(f + x, w[f"blk.{i}.layer_output_norm.weight"], w[f"blk.{i}.layer_output_norm.bias"])
    h = np.tanh(w["cls.weight"] @ x[0] + w["cls.bias"])
    return float((w["cls.output.weight"] @ h + w["cls.output.bias"])[0])


def tok(server, text: str) -> list[int]:
    return post(server.url + "/tokenize", json={"content": text, "add_special": False}).json()["tokens"]


def test_scores_are_the_models_and_ranked(server, reranker):
    _, w = reranker
    q = tok(server, QUERY)
    pairs = [[1, *q, 2, *tok(server, d), 2] for d in DOCS]  # BOS query EOS document EOS: add_bos, add_eos
    want = [reference_score(w, ids) for ids in pairs]
    assert max(want) - min(want) > 0.5  # the documents are told apart
    r = post(server.url + "/v1/rerank", json={"model": "tiny-reranker", "query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    body = r.json()
    got = {x["index"]: x["relevance_score"] for x in body["results"]}
    assert [x["index"] for x in body["results"]] == sorted(range(len(DOCS)), key=lambda i: -want[i])
    np.testing.assert_allclose([got[i] for i in range(len(DOCS))], want, atol=2e-2, rtol=1e-2)
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in pairs)


def test_top_n_documents_and_the_alias(server):
    full = post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()["results"]
    r = post(server.url + "/rerank", json={"query": QUERY, "documents": [{"text": d} for d in DOCS], "top_n": 2,
                                           "return_documents": True})
    assert r.status_code == 200, r.text
    res = r.json()["results"]
    assert [(x["index"], x["relevance_score"]) for x in res] == [(x["index"], x["relevance_score"]) for x in full[:2]]
    assert [x["document"]["text"] for x in res] == [DOCS[x["index"]] for x in res]


def test_bad_requests_are_400(server):
    for body, param in (({"documents": DOCS}, "query"), ({"query": "q", "documents": []}, "documents"),
                        ({"query": "q", "documents": [3]}, "documents"),
                        ({"query": "q", "documents": DOCS, "top_n": 0}, "top_n")):
        r = post(server.url + "/v1/rerank", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_model_rerank_is_the_servers(server, reranker):
    res = post(server.url + "/v1/rerank", json={"query": QUERY, "documents": DOCS}).json()["results"]
    with Model(reranker[0], n_ctx=128, prompt_cache=False) as m:
        got = m.rerank(QUERY, DOCS, top_n=3)
    assert [i for i, _ in got] == [x["index"] for x in res[:3]]
    np.testing.assert_allclose([s for _, s in got], [x["relevance_score"] for x in res[:3]], rtol=1e-6)


def test_a_model_that_is_not_a_reranker_is_400(default_model_path):
    with live_server(model=str(default_model_path), parallel=1, ctx=256, prompt_cache=False) as live:
        r = post(live.url + "/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert r.status_code == 400 and "not a reranker" in r.json()["error"]["message"]
    with Model(default_model_path, n_ctx=256, prompt_cache=False) as m:
        with pytest.raises(InvalidArgumentError, match="not a reranker"):
            m.rerank("q", ["d"])


def test_a_reranker_is_listed_as_one(server):
    from tests.serverutil import get

    assert get(server.api + "/models").json()["data"][0]["capabilities"] == ["rerank"]
