"""Request validation for the OpenAI-compatible endpoints.

Every field is checked for type and range and a bad one raises
:class:`~localllm.errors.InvalidArgumentError` naming it (a 400), so bad
input never reaches llama.cpp. Unknown fields are ignored, as OpenAI's own
clients send extras.

Example:
    >>> p = sampling({"temperature": 0, "max_tokens": 8}, default_max_tokens=16)
    >>> (p.temperature, p.max_tokens)
    (0.0, 8)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from localllm import runtime
from localllm.errors import InvalidArgumentError
from localllm.server.scheduler import GenParams

MAX_BEAMS = 8


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"'{param}' {msg}", param=param)


def get_number(body: Mapping[str, Any], key: str, default: float, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(key, "must be a finite number")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise _bad(key, f"must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and v > hi:
        raise _bad(key, f"must be <= {hi}")
    return float(v)


def get_int(body: Mapping[str, Any], key: str, default: int | None, lo: int | None = None,
            hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(key, "must be an integer")
    if lo is not None and v < lo:
        raise _bad(key, f"must be >= {lo}")
    if hi is not None and v > hi:
        raise _bad(key, f"must be <= {hi}")
    return v


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


def _stop(body: Mapping[str, Any]) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 16 or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of at most 16 strings")
    return [s for s in stops if s]


def _grammar(body: Mapping[str, Any]) -> str | None:
    """``grammar`` (GBNF, llama-server's field) or ``response_format`` → a grammar."""
    grammar = get_str(body, "grammar")
    rf = body.get("response_format")
    if rf is None:
        return grammar or None
    if not isinstance(rf, Mapping) or not isinstance(rf.get("type"), str):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = rf["type"]
    if kind == "text":
        return grammar or None
    if grammar:
        raise _bad("grammar", "cannot be combined with a JSON response_format")
    if kind == "json_object":
        return runtime.json_grammar()
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, Mapping):
            raise _bad("response_format", "json_schema must be an object with a 'schema'")
        schema = js.get("schema", {"type": "object"})
        if not isinstance(schema, (Mapping, bool)):
            raise _bad("response_format", "json_schema.schema must be a JSON schema object")
        return runtime.json_schema_to_grammar(schema)
    raise _bad("response_format", "type must be 'text', 'json_object' or 'json_schema'")


def sampling(body: Mapping[str, Any], *, default_max_tokens: int | None, max_n: int = 16) -> GenParams:
    """The sampling/stopping fields shared by both completion endpoints.

    Example:
        >>> sampling({"n": 2, "seed": 3}, default_max_tokens=None).n
        2
    """
    max_tokens = get_int(body, "max_completion_tokens", None, lo=1)
    max_tokens = get_int(body, "max_tokens", max_tokens if max_tokens is not None else default_max_tokens, lo=1)
    n = get_int(body, "n", 1, lo=1, hi=max_n)
    best_of = get_int(body, "best_of", n, lo=1, hi=max_n)
    assert n is not None and best_of is not None
    if best_of < n:
        raise _bad("best_of", "must be >= n")
    num_beams = get_int(body, "num_beams", 1, lo=1, hi=MAX_BEAMS)
    assert num_beams is not None
    if num_beams > 1 and (n > 1 or best_of > 1):
        raise _bad("num_beams", "cannot be combined with n or best_of")
    for key in ("presence_penalty", "frequency_penalty"):
        get_number(body, key, 0.0, -2.0, 2.0)  # accepted for compatibility; not applied
    seed = get_int(body, "seed", None)
    return GenParams(
        max_tokens=max_tokens,
        temperature=get_number(body, "temperature", 0.8, 0.0, 2.0),
        top_p=get_number(body, "top_p", 0.95, 0.0, 1.0, lo_open=True),
        top_k=get_int(body, "top_k", 40, lo=0) or 0,
        min_p=get_number(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=get_number(body, "repeat_penalty", 1.0, 0.0, 10.0, lo_open=True),
        seed=None if seed is None else seed & 0xFFFFFFFF,
        grammar=_grammar(body),
        ignore_eos=get_bool(body, "ignore_eos", False),
        stop=_stop(body), n=n, best_of=best_of, num_beams=num_beams)


def stream_flags(body: Mapping[str, Any], params: GenParams) -> tuple[bool, bool]:
    """(stream, include_usage) with OpenAI's rule that best_of and beams cannot stream."""
    stream = get_bool(body, "stream", False)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, Mapping):
        raise _bad("stream_options", "must be an object")
    include_usage = bool(opts and get_bool(opts, "include_usage", False))
    if stream and (params.best_of > params.n or params.num_beams > 1):
        raise _bad("stream", "cannot be used with best_of > n or num_beams > 1")
    return stream, include_usage


def completion_prompt(body: Mapping[str, Any], n_vocab: int) -> str | list[int]:
    """``prompt``: a string, a list with one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "must not be empty")
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        if not all(0 <= t < n_vocab for t in p):
            raise _bad("prompt", f"token ids must be in 0..{n_vocab - 1}")
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
