"""Anthropic's Messages API on the same core: request bodies → ``SamplingParams``
and chat messages, and the response, stream-event and error shapes.

Example:
    >>> stop_reason("length", None), stop_reason("stop", "###"), stop_reason("stop", None)
    ('max_tokens', 'stop_sequence', 'end_turn')
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from localllm.core.request import Choice, Request
from localllm.errors import InvalidArgumentError, LocalLLMError
from localllm.sampling import SamplingParams

# our error classes → Anthropic's error types (by HTTP status)
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error", 507: "api_error"}


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} {msg}", param=param)


def _text(v: Any, param: str) -> str:
    """A string, or a list of text blocks (Anthropic's content shape) joined."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and all(isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str)
                                   for b in v):
        return "".join(b["text"] for b in v)
    raise _bad(param, "must be a string or a list of text blocks")


def messages(body: Mapping[str, Any]) -> tuple[list[dict[str, str]], str | None]:
    """(chat messages, system) from an Anthropic body; only text content is taken."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
            raise _bad(f"messages.{i}.role", "must be 'user' or 'assistant'")
        out.append({"role": m["role"], "content": _text(m.get("content"), f"messages.{i}.content")})
    system = body.get("system")
    return out, None if system is None else _text(system, "system")


def sampling(body: Mapping[str, Any]) -> SamplingParams:
    if body.get("tools"):
        raise _bad("tools", "are not supported yet by this server")
    if "max_tokens" not in body:
        raise _bad("max_tokens", "is required")
    kw: dict[str, Any] = {"max_tokens": body["max_tokens"]}
    for k in ("temperature", "top_p", "top_k"):
        if body.get(k) is not None:
            kw[k] = body[k]
    if body.get("stop_sequences") is not None:
        kw["stop"] = body["stop_sequences"]
    try:
        return SamplingParams(**kw)
    except InvalidArgumentError as e:
        if e.param == "stop":
            e.param = "stop_sequences"
            e.message = e.message.replace("stop ", "stop_sequences ", 1)
        raise


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def message(mid: str, model: str, c: Choice, req: Request) -> dict[str, Any]:
    return {"id": mid, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": c.text}],
            "stop_reason": stop_reason(c.finish_reason, c.stop_sequence), "stop_sequence": c.stop_sequence,
            "usage": {"input_tokens": len(req.prompt), "output_tokens": req.completion_tokens}}


def event(kind: str, data: dict[str, Any]) -> str:
    """One server-sent event, named as Anthropic's stream names them."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


def start_events(mid: str, model: str, req: Request) -> list[str]:
    msg = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": None,
           "stop_sequence": None, "usage": {"input_tokens": len(req.prompt), "output_tokens": 0}}
    return [event("message_start", {"message": msg}),
            event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
            event("ping", {})]


def delta_event(text: str) -> str:
    return event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": text}})


def end_events(finish: str | None, stop_sequence: str | None, req: Request) -> list[str]:
    return [event("content_block_stop", {"index": 0}),
            event("message_delta", {"delta": {"stop_reason": stop_reason(finish, stop_sequence),
                                              "stop_sequence": stop_sequence},
                                    "usage": {"output_tokens": req.completion_tokens}}),
            event("message_stop", {})]


def error_body(e: LocalLLMError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _TYPES.get(e.status, "api_error"), "message": e.message}}
