"""OpenAI response shapes: completions, chat completions, their stream chunks,
logprobs and usage. Pure functions of the core's results.

Example:
    >>> from localllm.core.request import Choice
    >>> chat_choice(Choice(0, "Hi", "stop"))["message"]
    {'role': 'assistant', 'content': 'Hi'}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from localllm.core.logprobs import TokenLogprob
from localllm.core.request import Choice, Request
from localllm.tools import ToolSpec, parse


def _top(alts: list[tuple[int, bytes, float]]) -> list[dict[str, Any]]:
    return [{"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)} for _, b, lp in alts]


def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a chat completion: ``{"content": [...]}``."""
    if lps is None:
        return None
    return {"content": [{"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.bytes), "top_logprobs": _top(lp.top)}
                        for lp in lps], "refusal": None}


def completion_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[i].logprobs`` of a (legacy) completion."""
    if lps is None:
        return None
    return {"tokens": [lp.text for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{b.decode("utf-8", "replace"): v for _, b, v in lp.top} for lp in lps],
            "text_offset": [lp.offset for lp in lps]}


def chat_choice(c: Choice, tools: tuple[ToolSpec, str] | None = None) -> dict[str, Any]:
    """A chat choice; with tools, the answer split into content and ``tool_calls`` (an answer
    that is not a valid call stays content, and ``localllm.tool_call_error`` says why)."""
    if tools is None:
        msg: dict[str, Any] = {"role": "assistant", "content": c.text}
        if c.reasoning:
            msg["reasoning_content"] = c.reasoning
        return {"index": c.index, "message": msg, "logprobs": chat_logprobs(c.logprobs),
                "finish_reason": c.finish_reason}
    p = parse(c.text, *tools)  # the content alone: the reasoning is parted from it already
    msg = {"role": "assistant", "content": p.content}
    if c.reasoning:
        msg["reasoning_content"] = c.reasoning
    if p.calls:
        msg["tool_calls"] = p.calls
    out = {"index": c.index, "message": msg, "logprobs": chat_logprobs(c.logprobs),
           "finish_reason": "tool_calls" if p.calls else c.finish_reason}
    if p.error:
        out["localllm"] = {"tool_call_error": p.error}
    return out


def completion_choice(c: Choice) -> dict[str, Any]:
    return {"index": c.index, "text": c.text, "logprobs": completion_logprobs(c.logprobs),
            "finish_reason": c.finish_reason}


def usage(req: Request) -> dict[str, Any]:
    n = len(req.prompt)
    return {"prompt_tokens": n, "completion_tokens": req.completion_tokens,
            "total_tokens": n + req.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": req.cached_tokens}}


def response(rid: str, created: int, model: str, chat: bool, choices: list[Choice], req: Request,
             tools: tuple[ToolSpec, str] | None = None) -> dict[str, Any]:
    out = [chat_choice(c, tools) for c in choices] if chat else [completion_choice(c) for c in choices]
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
            "model": model, "choices": out, "usage": usage(req)}


def tool_stream(rid: str, created: int, model: str, req: Request, tools: tuple[ToolSpec, str], include_usage: bool,
                disconnected: Any) -> Iterator[str]:
    """A chat stream with tools: each choice is parsed when it ends, then sent as a content delta
    and/or ``tool_calls`` deltas (OpenAI's chunk shape), and its finish reason."""
    texts: dict[int, list[str]] = {}
    thoughts: dict[int, list[str]] = {}
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    extra = {"usage": None} if include_usage else {}
    try:
        for i in range(req.params.n):
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant"}, "logprobs": None,
                                           "finish_reason": None}], **extra})
        for ev in req.events(disconnected=disconnected):
            if ev.kind == "text":
                texts.setdefault(ev.index, []).append(ev.text)
            elif ev.kind == "reasoning":
                thoughts.setdefault(ev.index, []).append(ev.text)
            elif ev.kind == "done":
                c = chat_choice(Choice(ev.index, "".join(texts.pop(ev.index, [])), ev.finish_reason,
                                       reasoning="".join(thoughts.pop(ev.index, []))), tools)
                m = c["message"]
                delta: dict[str, Any] = {}
                if m.get("reasoning_content"):
                    delta["reasoning_content"] = m["reasoning_content"]
                if m["content"]:
                    delta["content"] = m["content"]
                if m.get("tool_calls"):
                    delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(m["tool_calls"])]
                if delta:
                    yield sse({**head, "choices": [{"index": ev.index, "delta": delta, "logprobs": None,
                                                   "finish_reason": None}], **extra})
                last = {"index": ev.index, "delta": {}, "logprobs": None, "finish_reason": c["finish_reason"]}
                if "localllm" in c:
                    last["localllm"] = c["localllm"]
                yield sse({**head, "choices": [last], **extra})
        if include_usage:
            yield sse(usage_chunk(rid, created, model, True, req))
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()


def chunk(rid: str, created: int, model: str, chat: bool, index: int, text: str | None, finish: str | None,
          lps: list[TokenLogprob] | None = None, role: bool = False, usage: bool = False,
          reasoning: bool = False) -> dict[str, Any]:
    """One stream chunk (a delta of one choice); with ``usage`` (stream_options.include_usage)
    it carries ``"usage": null``, as OpenAI's do before the last chunk. ``reasoning``: ``text``
    is thinking (``delta.reasoning_content``), not content."""
    if chat:
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["reasoning_content" if reasoning else "content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": chat_logprobs(lps),
                                  "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": completion_logprobs(lps), "finish_reason": finish}
    out = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
           "model": model, "choices": [choice]}
    if usage:
        out["usage"] = None
    return out


def usage_chunk(rid: str, created: int, model: str, chat: bool, req: Request) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(req)}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
