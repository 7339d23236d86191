"""Reranking at ``/v1/rerank`` (and ``/rerank``), in the shape llama-server and Jina use: a query and
documents in, the documents' indices and relevance scores out, best first. Scored by
:mod:`localllm.rerank` with a reranker GGUF; another model is a 400.

Example:
    >>> documents({"documents": ["a", {"text": "b"}]})
    ['a', 'b']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Response

from localllm.errors import InvalidArgumentError
from localllm.rerank import ranked
import localllm.server.protocol as protocol
from localllm.server.web import engine_for, json_response, read_body, state

ranking = Blueprint("ranking", __name__)
MAX_DOCUMENTS = 1000


def documents(body: Mapping[str, Any]) -> list[str]:
    """``documents`` (or TEI's ``texts``): strings or ``{"text": ...}`` objects."""
    key = "documents" if body.get("documents") is not None else "texts"
    docs = body.get(key)
    if not isinstance(docs, list) or not 0 < len(docs) <= MAX_DOCUMENTS:
        raise InvalidArgumentError(f"documents must be a list of 1 to {MAX_DOCUMENTS} strings or {{\"text\"}} objects",
                                   param="documents")
    out = []
    for i, d in enumerate(docs):
        text = d.get("text") if isinstance(d, Mapping) else d
        if not isinstance(text, str):
            raise InvalidArgumentError(f"documents[{i}] must be a string or an object with a \"text\" string",
                                       param="documents")
        out.append(text)
    return out


def _top_n(body: Mapping[str, Any], n: int) -> int:
    v = body.get("top_n")
    if v is None:
        return n
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InvalidArgumentError("top_n must be a positive integer", param="top_n")
    return min(v, n)


@ranking.post("/v1/rerank")
@ranking.post("/rerank")
def rerank() -> Response:
    """``{"query", "documents": [str | {"text"}], "top_n"?, "return_documents"?}`` →
    ``{"results": [{"index", "relevance_score", "document"?: {"text"}}], "usage"}``."""
    body = read_body()
    eng = engine_for(body)
    query = body.get("query")
    if not isinstance(query, str):
        raise InvalidArgumentError("query is required (a string)", param="query")
    docs = documents(body)
    top_n = _top_n(body, len(docs))
    with_docs = protocol.get_bool(body, "return_documents", False)
    scores, n_tokens = eng.rerank(query, docs)
    results = []
    for i in ranked(scores, top_n):
        item: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
        if with_docs:
            item["document"] = {"text": docs[i]}
        results.append(item)
    return json_response({"model": state().served_id(eng), "object": "list", "results": results,
                  "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})
