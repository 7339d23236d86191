"""Reading OpenAI-compatible request bodies.

A body's sampling fields become one :class:`~localllm.sampling.SamplingParams`,
which validates them (the same limits as ``Model`` and ``localllm run``); a
bad one raises :class:`~localllm.errors.InvalidArgumentError` naming it (a
400), so bad input never reaches llama.cpp. Unknown fields are ignored, as
OpenAI's own clients send extras.

Example:
    >>> p = sampling({"temperature": 0, "max_tokens": 8}, default_max_tokens=16, chat=True)
    >>> (p.temperature, p.max_tokens)
    (0.0, 8)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from localllm.core.reasoning import effort_budget
from localllm.errors import InvalidArgumentError
from localllm.sampling import SamplingParams

# body field -> SamplingParams field, where the names agree (llama-server's extensions included)
_SAME = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
         "repeat_last_n", "seed", "stop", "grammar", "logit_bias", "ignore_eos", "n", "best_of", "num_beams")


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} {msg}", param=param)


def get_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise _bad(key, "must be true or false")
    return v


def get_str(body: Mapping[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(key, "must be a string")
    return v


def _schema(v: Any, where: str) -> Any:
    if not isinstance(v, (Mapping, bool)):
        raise _bad("response_format", f"{where} must be a JSON schema object")
    return v


def _json_schema(body: Mapping[str, Any]) -> Any:
    """``response_format`` → a JSON schema (``{"type": "object"}``: any JSON object), or None.

    Accepted where clients put it: OpenAI's ``{"type": "json_schema", "json_schema": {"name",
    "schema", "strict"}}``; the schema one level up, ``{"type": "json_schema", "schema": {...}}``
    and ``{"type": "json_object", "schema": {...}}`` (llama-server's and vLLM's shapes); and a
    top-level ``json_schema`` field beside ``response_format`` (llama-server's extension).

    Example:
        >>> _json_schema({"response_format": {"type": "json_schema", "schema": {"type": "array"}}})
        {'type': 'array'}
    """
    rf = body.get("response_format")
    top = body.get("json_schema")
    if rf is None:
        return None if top is None else _schema(top, "json_schema")
    if top is not None:
        raise _bad("json_schema", "cannot be combined with response_format")
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _schema(rf["schema"], "schema") if rf.get("schema") is not None else {"type": "object"}
    if kind == "json_schema":
        js = rf.get("json_schema")
        if js is None and rf.get("schema") is not None:
            return _schema(rf["schema"], "schema")
        if not isinstance(js, Mapping):
            raise _bad("response_format", "json_schema must be an object with a 'schema'")
        return _schema(js.get("schema", {"type": "object"}), "json_schema.schema")
    raise _bad("response_format", "type must be 'text', 'json_object' or 'json_schema'")


def _logprobs(body: Mapping[str, Any], chat: bool) -> tuple[bool, int]:
    """Chat: ``logprobs`` (bool) + ``top_logprobs`` (0-20). Completions: ``logprobs`` (0-5)."""
    v = body.get("logprobs")
    if chat:
        on = get_bool(body, "logprobs", False)
        top = body.get("top_logprobs")
        if top is not None and not on:
            raise _bad("top_logprobs", "needs logprobs to be true")
        return on, 0 if top is None else top
    if v is None:
        return False, 0
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 5:
        raise _bad("logprobs", "must be an integer in 0..5 (completions)")
    return True, v


def sampling(body: Mapping[str, Any], *, default_max_tokens: int | None, chat: bool) -> SamplingParams:
    """The sampling/stopping fields of both completion endpoints as one SamplingParams.

    Example:
        >>> sampling({"n": 2, "seed": 3}, default_max_tokens=None, chat=False).n
        2
    """
    kw: dict[str, Any] = {k: body[k] for k in _SAME if body.get(k) is not None}
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
    kw["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    schema = _json_schema(body)
    if schema is not None:
        if kw.get("grammar"):
            raise _bad("grammar", "cannot be combined with a JSON response_format")
        kw["json_schema"] = schema
    kw["logprobs"], kw["top_logprobs"] = _logprobs(body, chat)
    if chat:
        kw["reasoning_budget"] = reasoning_budget(body)
    try:
        return SamplingParams(**kw)
    except InvalidArgumentError as e:
        if e.param == "json_schema":
            e.param = "response_format"
        raise


def reasoning_budget(body: Mapping[str, Any]) -> int | None:
    """A chat's thinking budget in tokens: ``reasoning_budget`` (llama-server's word), else
    OpenAI's ``reasoning_effort`` (none 0, minimal 256, low 1024, medium 4096, high 16384), else
    ``reasoning.effort`` / ``reasoning.max_tokens`` (Open WebUI, OpenRouter), else None.

    Example:
        >>> reasoning_budget({"reasoning_effort": "none"}), reasoning_budget({"reasoning_budget": 64})
        (0, 64)
    """
    if body.get("reasoning_budget") is not None:
        return body["reasoning_budget"]  # SamplingParams checks it
    if body.get("reasoning_effort") is not None:
        return effort_budget(body["reasoning_effort"])
    r = body.get("reasoning")  # {"effort": ...} or {"max_tokens": N}: Open WebUI's and OpenRouter's shape
    if r is None:
        return None
    if not isinstance(r, Mapping):
        raise _bad("reasoning", 'must be an object such as {"effort": "low"} or {"max_tokens": 512}')
    if r.get("max_tokens") is not None:
        return r["max_tokens"]
    return None if r.get("effort") is None else effort_budget(r["effort"])


def stream_flags(body: Mapping[str, Any], params: SamplingParams) -> tuple[bool, bool]:
    """(stream, include_usage) with OpenAI's rule that best_of and beams cannot stream."""
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, Mapping):
        raise _bad("stream_options", "must be an object")
    include_usage = bool(opts and get_bool(opts, "include_usage", False))
    if stream and (params.best_of > params.n or params.num_beams > 1):
        raise _bad("stream", "cannot be used with best_of > n or num_beams > 1 (the answer is chosen at the end)")
    return stream, include_usage


def completion_prompt(body: Mapping[str, Any]) -> str | list[int]:
    """``prompt``: a string, a list with one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "must not be empty")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return list(p)
    if p is None:
        raise _bad("prompt", "is required")
    raise _bad("prompt", "must be a string, a list with one string, or a list of token ids")


def embedding_input(body: Mapping[str, Any]) -> list[str]:
    v = body.get("input")
    texts = [v] if isinstance(v, str) else v
    if not isinstance(texts, list) or not texts or len(texts) > 256 or not all(isinstance(t, str) for t in texts):
        raise _bad("input", "must be a string or a list of 1 to 256 strings")
    return texts


def check_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise InvalidArgumentError("the request body must be a JSON object", param=None)
    return body
