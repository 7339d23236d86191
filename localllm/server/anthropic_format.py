"""Anthropic's Messages API on the same core: request bodies → ``SamplingParams``
and chat messages, and the response, stream-event and error shapes.

Example:
    >>> stop_reason("length", None), stop_reason("stop", "###"), stop_reason("stop", None)
    ('max_tokens', 'stop_sequence', 'end_turn')
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from localllm.core.reasoning import EFFORT_BUDGETS
from localllm.core.request import Choice, Request
from localllm.errors import InvalidArgumentError, LocalLLMError
from localllm.sampling import SamplingParams
from localllm.tools import ToolSpec, parse, spec_from

# Anthropic's output_config.effort → a thinking budget in tokens (OpenAI's reasoning_effort table)
_EFFORTS = {k: EFFORT_BUDGETS[k] for k in ("low", "medium", "high")}

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


def _blocks(m: Mapping[str, Any], i: int) -> list[dict[str, Any]]:
    """One Anthropic message → chat messages: text, an assistant's ``tool_use`` blocks as
    ``tool_calls``, a user's ``tool_result`` blocks as ``tool`` messages."""
    content, role, p = m.get("content"), m["role"], f"messages.{i}.content"
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list) or not all(isinstance(b, Mapping) for b in content):
        raise _bad(p, "must be a string or a list of content blocks")
    text = "".join(b["text"] for b in content if b.get("type") == "text" and isinstance(b.get("text"), str))
    calls, results = [], []
    for j, b in enumerate(content):
        kind = b.get("type")
        if kind == "tool_use" and role == "assistant" and isinstance(b.get("name"), str):
            calls.append({"id": str(b.get("id", "")), "type": "function",
                          "function": {"name": b["name"], "arguments": json.dumps(b.get("input", {}))}})
        elif kind == "tool_result" and role == "user":
            results.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": _text(b.get("content", ""), f"{p}.{j}.content")})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # earlier thinking is not read again (templates drop it too)
        elif kind != "text":
            raise _bad(f"{p}.{j}", "must be a text, thinking, tool_use (assistant) or tool_result (user) block")
    if calls:
        return [{"role": "assistant", "content": text or None, "tool_calls": calls}]
    return results + ([{"role": role, "content": text}] if text or not results else [])


def messages(body: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """(chat messages, system) from an Anthropic body."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "must be a non-empty list")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(msgs):
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant", "system"):
            raise _bad(f"messages.{i}.role", "must be 'user', 'assistant' or 'system'")
        if m["role"] == "system":  # Claude Code sends context this way; templates take one system turn, first
            m = {"role": "user", "content": _text(m.get("content", ""), f"messages.{i}.content")}
        for turn in _blocks(m, i):
            if out and turn["role"] == out[-1]["role"] == "user":  # turns alternate, as Anthropic merges them
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + turn["content"]}
            else:
                out.append(turn)
    return out, _system(body.get("system"))


# Claude Code's first system block: ``x-anthropic-billing-header: cc_version=...; cch=<hash>;``, a
# telemetry line whose hash changes on every request. Kept, it would end every prompt's shared
# prefix a few tokens in, and no turn could reuse the cache; it means nothing to the model.
_BILLING = re.compile(r"^x-anthropic-billing-header:[^\n]*\n?", re.IGNORECASE)


def _system(system: Any) -> str | None:
    """The ``system`` field as text: blocks joined, the per-request billing header dropped."""
    if system is None:
        return None
    if isinstance(system, str):  # the header as a first line of its own
        return _BILLING.sub("", system) if "\n" in system else system
    if isinstance(system, list) and all(isinstance(b, Mapping) for b in system):
        system = [b for b in system if not (isinstance(b.get("text"), str) and _BILLING.match(b["text"]))]
    return _text(system, "system")


def tool_spec(body: Mapping[str, Any]) -> ToolSpec | None:
    """Anthropic's ``tools`` / ``tool_choice`` as the core's :class:`ToolSpec`."""
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools", "must be a list")
    conv = []
    for i, t in enumerate(tools):
        if not isinstance(t, Mapping):
            raise _bad(f"tools.{i}", "must be an object")
        conv.append({"type": "function", "function": {"name": t.get("name"), "description": t.get("description", ""),
                                                      "parameters": t.get("input_schema", {"type": "object"})}})
    tc = body.get("tool_choice") or {"type": "auto"}
    kind = tc.get("type") if isinstance(tc, Mapping) else None
    choice: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
    if kind == "tool":
        choice = {"type": "function", "function": {"name": tc.get("name")}}
    if choice is None:
        raise _bad("tool_choice", "type must be auto, any, tool or none")
    parallel = tc.get("disable_parallel_tool_use") is False
    try:
        return spec_from(conv, choice, parallel)
    except InvalidArgumentError as e:
        raise _bad(str(e.param).replace("[", ".").replace("]", "").replace(".function", ""),
                   e.message.split(" ", 1)[1]) from None


def _content(c: Choice, tools: tuple[ToolSpec, str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The answer's content blocks (its thinking first), and the tool-call error, if any."""
    thought = [{"type": "thinking", "thinking": c.reasoning, "signature": ""}] if c.reasoning else []
    if tools is None:
        return thought + [{"type": "text", "text": c.text}], None
    p = parse(c.text, *tools)
    blocks: list[dict[str, Any]] = thought + ([{"type": "text", "text": p.content}] if p.content else [])
    blocks += [{"type": "tool_use", "id": "toolu_" + call["id"].removeprefix("call_"),
                "name": call["function"]["name"], "input": json.loads(call["function"]["arguments"])}
               for call in p.calls]
    return blocks if len(blocks) > len(thought) else blocks + [{"type": "text", "text": ""}], p.error


def sampling(body: Mapping[str, Any]) -> SamplingParams:
    if "max_tokens" not in body:
        raise _bad("max_tokens", "is required")
    kw: dict[str, Any] = {"max_tokens": body["max_tokens"]}
    for k in ("temperature", "top_p", "top_k"):
        if body.get(k) is not None:
            kw[k] = body[k]
    if body.get("stop_sequences") is not None:
        kw["stop"] = body["stop_sequences"]
    kw["reasoning_budget"] = thinking_budget(body.get("thinking"), body.get("output_config"))
    try:
        return SamplingParams(**kw)
    except InvalidArgumentError as e:
        if e.param == "stop":
            e.param = "stop_sequences"
            e.message = e.message.replace("stop ", "stop_sequences ", 1)
        raise


def thinking_budget(thinking: Any, output_config: Any = None) -> int | None:
    """``thinking``: ``{"type": "enabled", "budget_tokens": N}`` → N, ``{"type": "disabled"}`` → 0
    (the template's switch, where it has one), ``{"type": "adaptive"}`` (what Claude Code sends: the
    model decides) → the budget of ``output_config.effort`` (low 1024, medium 4096, high 16384, max:
    none), absent → None (the model's own way).

    Example:
        >>> thinking_budget({"type": "enabled", "budget_tokens": 2048}), thinking_budget({"type": "disabled"})
        (2048, 0)
        >>> thinking_budget({"type": "adaptive"}, {"effort": "low"}), thinking_budget({"type": "adaptive"})
        (1024, None)
    """
    if thinking is None:
        return None
    kind = thinking.get("type") if isinstance(thinking, Mapping) else None
    if kind == "disabled":
        return 0
    if kind == "adaptive":
        effort = output_config.get("effort") if isinstance(output_config, Mapping) else None
        if effort is None or effort == "max":
            return None
        if effort not in _EFFORTS:
            raise _bad("output_config.effort", f"must be one of {', '.join(_EFFORTS)} or max")
        return _EFFORTS[effort]
    if kind != "enabled":
        raise _bad("thinking", 'must be {"type": "enabled", "budget_tokens": N}, {"type": "adaptive"} '
                               'or {"type": "disabled"}')
    n = thinking.get("budget_tokens")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise _bad("thinking.budget_tokens", "must be a non-negative integer")
    return n


def stop_reason(finish: str | None, stop_sequence: str | None) -> str:
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_sequence else "end_turn"


def message(mid: str, model: str, c: Choice, req: Request, tools: tuple[ToolSpec, str] | None = None
            ) -> dict[str, Any]:
    blocks, err = _content(c, tools)
    used = any(b["type"] == "tool_use" for b in blocks)
    out = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": blocks,
           "stop_reason": "tool_use" if used else stop_reason(c.finish_reason, c.stop_sequence),
           "stop_sequence": c.stop_sequence,
           "usage": usage(req)}
    if err:
        out["localllm"] = {"tool_call_error": err}
    return out


def usage(req: Request, *, output: bool = True) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` are those not read from the prompt cache, which
    ``cache_read_input_tokens`` counts (the sum is the prompt). The cache keeps every prompt by
    itself, so nothing is reported as written for a ``cache_control`` breakpoint."""
    n, cached = len(req.prompt), min(req.cached_tokens, len(req.prompt))
    out = {"input_tokens": n - cached, "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
           "output_tokens": req.completion_tokens if output else 0}
    return out


def tool_events(mid: str, model: str, c: Choice, req: Request, tools: tuple[ToolSpec, str]) -> list[str]:
    """A whole answer with tools as Anthropic's stream events (a call is known only at the end)."""
    msg = message(mid, model, c, req, tools)
    head = {**msg, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": usage(req, output=False)}
    head.pop("localllm", None)
    out = [event("message_start", {"message": head})]
    for k, b in enumerate(msg["content"]):
        if b["type"] == "thinking":
            out += [event("content_block_start", {"index": k, "content_block": {**b, "thinking": ""}}),
                    event("content_block_delta", {"index": k, "delta": {"type": "thinking_delta",
                                                                        "thinking": b["thinking"]}}),
                    event("content_block_delta", {"index": k, "delta": {"type": "signature_delta",
                                                                        "signature": b["signature"]}})]
        elif b["type"] == "text":
            out += [event("content_block_start", {"index": k, "content_block": {"type": "text", "text": ""}}),
                    event("content_block_delta", {"index": k, "delta": {"type": "text_delta", "text": b["text"]}})]
        else:
            out += [event("content_block_start", {"index": k, "content_block": {**b, "input": {}}}),
                    event("content_block_delta", {"index": k, "delta": {"type": "input_json_delta",
                                                                        "partial_json": json.dumps(b["input"])}})]
        out.append(event("content_block_stop", {"index": k}))
    delta = {"delta": {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]},
             "usage": usage(req)}
    if "localllm" in msg:
        delta["localllm"] = msg["localllm"]
    return out + [event("message_delta", delta), event("message_stop", {})]


def event(kind: str, data: dict[str, Any]) -> str:
    """One server-sent event, named as Anthropic's stream names them."""
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class Blocks:
    """A streamed answer's content blocks: a thinking block (``thinking_delta`` events, then an
    empty ``signature_delta``) while the model reasons, then the text block."""

    def __init__(self) -> None:
        self.index = -1
        self.kind: str | None = None

    def start(self, mid: str, model: str, req: Request) -> list[str]:
        msg = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None,
               "usage": usage(req, output=False)}
        # a reasoning model's first block is known with its first text; any other's is text
        return [event("message_start", {"message": msg}), *([] if req.thinking else self._open("text")),
                event("ping", {})]

    def _open(self, kind: str) -> list[str]:
        out = self._close()
        self.index, self.kind = self.index + 1, kind
        block = {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
        return out + [event("content_block_start", {"index": self.index, "content_block": block})]

    def _close(self) -> list[str]:
        if self.kind is None:
            return []
        out = []
        if self.kind == "thinking":
            out.append(event("content_block_delta", {"index": self.index,
                                                     "delta": {"type": "signature_delta", "signature": ""}}))
        self.kind = None
        return out + [event("content_block_stop", {"index": self.index})]

    def delta(self, text: str, thinking: bool = False) -> list[str]:
        kind = "thinking" if thinking else "text"
        out = self._open(kind) if self.kind != kind else []
        d = {"type": "thinking_delta", "thinking": text} if thinking else {"type": "text_delta", "text": text}
        return out + [event("content_block_delta", {"index": self.index, "delta": d})]

    def end(self, finish: str | None, stop_sequence: str | None, req: Request) -> list[str]:
        out = self._open("text") if self.kind != "text" else []  # an answer has a text block, if empty
        return out + self._close() + [
            event("message_delta", {"delta": {"stop_reason": stop_reason(finish, stop_sequence),
                                              "stop_sequence": stop_sequence},
                                    "usage": usage(req)}),
            event("message_stop", {})]


def error_body(e: LocalLLMError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": _TYPES.get(e.status, "api_error"), "message": e.message}}
