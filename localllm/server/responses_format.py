"""OpenAI's Responses API on the same core: a request body → chat messages, ``SamplingParams`` and
a ``ToolSpec``; a finished choice → the response object, its output items and its stream events.

``input`` is a string (one user message) or a list of items: messages (content a string or
``input_text``/``output_text`` parts; ``developer`` is read as ``system``), ``function_call`` items
(an assistant's ``tool_calls``) and ``function_call_output`` items (``tool`` messages).
``instructions`` is the system message of this response only.

Example:
    >>> input_messages([{"role": "developer", "content": [{"type": "input_text", "text": "Be brief."}]},
    ...                 {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
    ...                 {"type": "function_call_output", "call_id": "c1", "output": "42"}])[0]
    {'role': 'system', 'content': 'Be brief.'}
    >>> stop_status("length", [])
    ('incomplete', {'reason': 'max_output_tokens'})
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localllm.core.request import Choice, Request
from localllm.errors import InvalidArgumentError, LocalLLMError
from localllm.sampling import SamplingParams
import localllm.server.protocol as protocol
from localllm.tools import ToolSpec, parse, spec_from

# sampling fields read as chat completions reads them (llama-server's extensions included)
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
             "seed", "stop")
_PARTS = {"user": "input_text", "system": "input_text", "developer": "input_text", "assistant": "output_text"}


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} {msg}", param=param)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---------------------------------------------------------------------- the request
def _text(content: Any, p: str, part: str) -> str:
    """A string, or a list of ``part`` parts (text only) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(p, f"must be a string or a list of {part} parts")
    texts = []
    for j, c in enumerate(content):
        if not isinstance(c, Mapping) or c.get("type") != part or not isinstance(c.get("text"), str):
            raise _bad(f"{p}[{j}]", f"must be an {part} part (only text is supported here)")
        texts.append(c["text"])
    return "".join(texts)


def _message(item: Mapping[str, Any], p: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in _PARTS:
        raise _bad(f"{p}.role", "must be 'user', 'assistant', 'system' or 'developer'")
    return {"role": "system" if role == "developer" else role,
            "content": _text(item.get("content"), f"{p}.content", _PARTS[role])}


def _string(item: Mapping[str, Any], key: str, p: str) -> str:
    v = item.get(key)
    if not isinstance(v, str) or (key != "arguments" and not v):
        raise _bad(f"{p}.{key}", "must be a string" if key == "arguments" else "must be a non-empty string")
    return v


def input_messages(value: Any, names: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """``input`` → chat messages; consecutive ``function_call`` items join one assistant message.
    ``names``: call id → function name of calls made earlier in the conversation."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _bad("input", "must be a string or a non-empty list of items")
    out: list[dict[str, Any]] = []
    called = dict(names or {})
    for i, item in enumerate(value):
        p = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise _bad(p, "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, p))
        elif kind == "function_call":
            call = {"id": _string(item, "call_id", p), "type": "function",
                    "function": {"name": _string(item, "name", p), "arguments": _string(item, "arguments", p)}}
            called[call["id"]] = call["function"]["name"]
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            cid = _string(item, "call_id", p)
            msg = {"role": "tool", "tool_call_id": cid, "content": _text(item.get("output"), f"{p}.output",
                                                                            "input_text")}
            if cid in called:
                msg["name"] = called[cid]
            out.append(msg)
        else:
            raise _bad(f"{p}.type", "must be 'message', 'function_call' or 'function_call_output'")
    return out


def call_names(messages: list[dict[str, Any]]) -> dict[str, str]:
    """Call id → function name, for every call in ``messages``."""
    return {c["id"]: c["function"]["name"] for m in messages for c in m.get("tool_calls") or []}


def tools_of(body: Mapping[str, Any]) -> tuple[ToolSpec | None, list[dict[str, Any]], Any]:
    """(the core's ToolSpec, the function tools as the response echoes them, ``tool_choice`` as given)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", "must be a list of function tools")
    echo, chat = [], []
    for i, t in enumerate(tools or []):
        if not isinstance(t, Mapping) or t.get("type") != "function":
            raise _bad(f"tools[{i}].type", "must be 'function' (only function tools are supported here)")
        f = {k: t[k] for k in ("name", "description", "parameters") if t.get(k) is not None}
        chat.append({"type": "function", "function": f})
        echo.append({"type": "function", "name": t.get("name"), "description": t.get("description"),
                     "parameters": t.get("parameters"), "strict": t.get("strict")})
    conv: Any = choice
    if isinstance(choice, Mapping):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise _bad("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "name": ...}')
        conv = {"type": "function", "function": {"name": choice["name"]}}
    try:
        spec = spec_from(chat if tools else None, conv, body.get("parallel_tool_calls"))
    except InvalidArgumentError as e:
        p = str(e.param or "").replace(".function", "")
        raise _bad(p, e.message.split(" ", 1)[1]) from None
    return spec, echo, choice if choice is not None else "auto"


def _text_format(body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``text.format`` → (the format as echoed, chat's ``response_format`` or None)."""
    text = body.get("text")
    if text is None:
        return {"type": "text"}, None
    fmt = text.get("format") if isinstance(text, Mapping) else None
    if fmt is None and isinstance(text, Mapping):
        return {"type": "text"}, None
    if not isinstance(fmt, Mapping) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise _bad("text.format", "must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                                  "{\"type\": \"json_schema\", \"name\": ..., \"schema\": {...}}")
    if fmt["type"] == "json_schema":
        return dict(fmt), {"type": "json_schema", "json_schema": {"schema": fmt.get("schema", {"type": "object"})}}
    return dict(fmt), None if fmt["type"] == "text" else {"type": fmt["type"]}


def sampling(body: Mapping[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """(the body's SamplingParams, ``text`` as the response echoes it); errors name the Responses field."""
    shown, rf = _text_format(body)
    chat = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    chat["max_tokens"] = body.get("max_output_tokens")
    if rf is not None:
        chat["response_format"] = rf
    try:
        return protocol.sampling(chat, default_max_tokens=None, chat=True), {"format": shown}
    except InvalidArgumentError as e:
        name = {"max_tokens": "max_output_tokens", "response_format": "text.format"}.get(e.param or "")
        if name:
            raise _bad(name, e.message.split(" ", 1)[1]) from None
        raise


def check_unsupported(body: Mapping[str, Any]) -> None:
    """Fields that would change the answer and are not served here: a clear 400, never ignored."""
    for key, why in (("background", "background responses are not supported"),
                     ("conversation", "conversations are not supported (use previous_response_id)"),
                     ("prompt", "prompt templates are not supported")):
        if body.get(key) not in (None, False):
            raise _bad(key, f"is not supported: {why}")
    if body.get("instructions") is not None and not isinstance(body["instructions"], str):
        raise _bad("instructions", "must be a string")
    if body.get("metadata") is not None and not isinstance(body["metadata"], Mapping):
        raise _bad("metadata", "must be an object")


# ---------------------------------------------------------------------- the answer
def stop_status(finish: str | None, items: list[dict[str, Any]]) -> tuple[str, dict[str, Any] | None]:
    """(status, incomplete_details): a cap reached without a finished call is ``incomplete``."""
    if finish == "length" and not any(it["type"] == "function_call" for it in items):
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": mid, "status": status, "role": "assistant",
            "content": [output_text(text)] if status != "in_progress" else []}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def output_items(c: Choice, tools: tuple[ToolSpec, str] | None) -> tuple[list[dict[str, Any]], str | None]:
    """The answer as output items (a message and/or ``function_call`` items) and the tool-call error."""
    if tools is None:
        text, calls, err = c.text, [], None
    else:
        p = parse(c.text, *tools)
        text, calls, err = p.content, p.calls, p.error
    status = "incomplete" if c.finish_reason == "length" and not calls else "completed"
    items = [message_item(new_id("msg"), text, status)] if text or not calls else []
    for call in calls:
        items.append({"type": "function_call", "id": new_id("fc"), "call_id": call["id"],
                      "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                      "status": "completed"})
    return items, err


def answer_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Output items → the assistant message a later turn sees (kept for ``previous_response_id``)."""
    text = "".join(c["text"] for it in items if it["type"] == "message" for c in it["content"])
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in items if it["type"] == "function_call"]
    if calls:
        return [{"role": "assistant", "content": text or None, "tool_calls": calls}]
    return [{"role": "assistant", "content": text}]


def usage(req: Request) -> dict[str, Any]:
    n = len(req.prompt)
    return {"input_tokens": n, "input_tokens_details": {"cached_tokens": req.cached_tokens},
            "output_tokens": req.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n + req.completion_tokens}


@dataclass
class Head:
    """What every response object of one request repeats (its id, model and the request's settings)."""

    id: str
    created_at: int
    model: str
    echo: dict[str, Any]

    def response(self, status: str, output: list[dict[str, Any]], req: Request | None = None,
                 incomplete: dict[str, Any] | None = None, error: str | None = None) -> dict[str, Any]:
        out = {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
               "error": None, "incomplete_details": incomplete, "model": self.model, "output": output,
               **self.echo, "usage": usage(req) if req is not None else None}
        if error:
            out["localllm"] = {"tool_call_error": error}
        return out


class Events:
    """Server-sent events of one streamed response, numbered by ``sequence_number``."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, kind: str, **data: Any) -> str:
        body = {"type": kind, "sequence_number": self.n, **data}
        self.n += 1
        return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"

    def error(self, e: LocalLLMError) -> str:
        return self("error", code=e.code, message=e.message, param=e.param)

    def text_open(self, index: int, mid: str) -> list[str]:
        return [self("response.output_item.added", output_index=index, item=message_item(mid, "", "in_progress")),
                self("response.content_part.added", item_id=mid, output_index=index, content_index=0,
                     part=output_text(""))]

    def text_delta(self, index: int, mid: str, delta: str) -> str:
        return self("response.output_text.delta", item_id=mid, output_index=index, content_index=0, delta=delta,
                    logprobs=[])

    def text_close(self, index: int, item: dict[str, Any]) -> list[str]:
        part, mid = item["content"][0], item["id"]
        return [self("response.output_text.done", item_id=mid, output_index=index, content_index=0,
                     text=part["text"], logprobs=[]),
                self("response.content_part.done", item_id=mid, output_index=index, content_index=0, part=part),
                self("response.output_item.done", output_index=index, item=item)]

    def call(self, index: int, item: dict[str, Any]) -> list[str]:
        """A whole function call (known only when the answer ends)."""
        fid = item["id"]
        return [self("response.output_item.added", output_index=index,
                     item={**item, "arguments": "", "status": "in_progress"}),
                self("response.function_call_arguments.delta", item_id=fid, output_index=index,
                     delta=item["arguments"]),
                self("response.function_call_arguments.done", item_id=fid, output_index=index,
                     arguments=item["arguments"]),
                self("response.output_item.done", output_index=index, item=item)]

    def items(self, items: list[dict[str, Any]]) -> list[str]:
        """Finished output items, each opened, filled in one delta and closed."""
        out: list[str] = []
        for k, it in enumerate(items):
            if it["type"] == "message":
                text = it["content"][0]["text"]
                out += self.text_open(k, it["id"]) + ([self.text_delta(k, it["id"], text)] if text else [])
                out += self.text_close(k, it)
            else:
                out += self.call(k, it)
        return out

    def end(self, response: dict[str, Any]) -> str:
        kind = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        return self(kind, response=response)
