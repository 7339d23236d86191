"""OpenAI's Responses API (a Flask blueprint): ``POST /v1/responses``, streamed or not, and
``GET``/``DELETE /v1/responses/{id}`` for the responses kept for ``previous_response_id``
(:mod:`.responses_store`). Shapes are in :mod:`.responses_format`; generation is the same
core request as a chat completion.

Example:
    >>> app.register_blueprint(responses_api)                   # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request

from localllm import tools as toolsmod
from localllm.core.request import Request, collect
from localllm.errors import InvalidArgumentError, LocalLLMError, NotFoundError
import localllm.server.protocol as protocol
import localllm.server.responses_format as fmt
from localllm.server.responses_store import ResponseStore, Stored
from localllm.server.web import account, answer, engine_for, event_stream, json_response, read_body, state

responses_api = Blueprint("responses", __name__)


def _store() -> ResponseStore:
    store: ResponseStore = state().responses
    return store


def _history(prev: str | None) -> list[dict[str, Any]]:
    """The conversation ``previous_response_id`` ends (OpenAI's 400 when it is not kept)."""
    if prev is None:
        return []
    found = _store().get(prev)
    if found is None:
        e = InvalidArgumentError(f"Previous response with id '{prev}' not found.", param="previous_response_id")
        e.code = "previous_response_not_found"
        raise e
    return list(found.messages)


class _Turn:
    """One request's conversation, its head (id, model, echoed settings) and how it ends; ``keep`` is
    the store (captured here: a stream ends after the request context is gone), None with ``store: false``."""

    def __init__(self, head: fmt.Head, convo: list[dict[str, Any]], keep: ResponseStore | None,
                 tools: tuple[toolsmod.ToolSpec, str] | None) -> None:
        self.head, self.convo, self.keep, self.tools = head, convo, keep, tools

    def finish(self, items: list[dict[str, Any]], finish: str | None, req: Request, err: str | None = None
               ) -> dict[str, Any]:
        """The final response object, kept (with the answer in its conversation) unless ``store`` is false."""
        status, incomplete = fmt.stop_status(finish, items)
        resp = self.head.response(status, items, req, incomplete, err)
        if self.keep is not None:
            self.keep.put(self.head.id, Stored(self.convo + fmt.answer_messages(items), resp))
        return resp


@responses_api.post("/v1/responses")
def create() -> Response:
    body = read_body()
    eng = engine_for(body)
    fmt.check_unsupported(body)
    params, text = fmt.sampling(body)
    spec, tools_echo, choice = fmt.tools_of(body)
    params = toolsmod.with_grammar(params, spec, eng.tool_family)
    stream, store = protocol.get_bool(body, "stream", False), protocol.get_bool(body, "store", True)
    prev = protocol.get_str(body, "previous_response_id")
    history = _history(prev)
    if body.get("input") is None:
        raise InvalidArgumentError("input is required", param="input")
    convo = history + fmt.input_messages(body["input"], fmt.call_names(history))
    instructions = body.get("instructions")
    system = [{"role": "system", "content": instructions}] if instructions else []
    req = Request(eng.chat_ids(system + convo, tools=spec), params, stream=stream)
    parallel = spec.parallel if spec else body.get("parallel_tool_calls") is not False
    echo = {"instructions": instructions, "max_output_tokens": params.max_tokens,
            "metadata": body.get("metadata") or {}, "parallel_tool_calls": parallel, "previous_response_id": prev,
            "reasoning": None, "store": store, "temperature": params.temperature, "text": text,
            "tool_choice": choice, "tools": tools_echo, "top_p": params.top_p, "truncation": "disabled",
            "user": body.get("user")}
    st = state()
    head = fmt.Head(fmt.new_id("resp"), int(time.time()), st.served_id(eng), echo)
    calls = (spec, eng.tool_family) if spec is not None and spec.active else None
    turn = _Turn(head, convo, _store() if store else None, calls)
    eng.submit(req)
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")
    metrics = st.metrics
    if not stream:
        c = answer(req)[0]
        items, err = fmt.output_items(c, turn.tools)
        return json_response(turn.finish(items, c.finish_reason, req, err))
    return event_stream(_events(turn, req, disconnected), lambda: account(metrics, req))


def _events(turn: _Turn, req: Request, disconnected: Callable[[], bool] | None) -> Iterator[str]:
    """The stream: created, in_progress, the output items (text as it comes; with tools, whole at
    the end: a call is known only then), then completed or incomplete."""
    ev = fmt.Events()
    try:
        yield ev("response.created", response=turn.head.response("in_progress", []))
        yield ev("response.in_progress", response=turn.head.response("in_progress", []))
        if turn.tools is not None:
            c = collect(req.events(disconnected=disconnected), 1)[0]
            items, err = fmt.output_items(c, turn.tools)
            yield from ev.items(items)
            yield ev.end(turn.finish(items, c.finish_reason, req, err))
            return
        mid, texts, finish = fmt.new_id("msg"), [], None
        yield from ev.text_open(0, mid)
        for e in req.events(disconnected=disconnected):
            if e.kind == "text" and e.text:
                texts.append(e.text)
                yield ev.text_delta(0, mid, e.text)
            elif e.kind == "done":
                finish = e.finish_reason
        status, _ = fmt.stop_status(finish, [])
        item = fmt.message_item(mid, "".join(texts), status)
        yield from ev.text_close(0, item)
        yield ev.end(turn.finish([item], finish, req))
    except LocalLLMError as e:  # headers are gone: report in the stream, as OpenAI does
        yield ev.error(e)
    finally:
        req.cancel()


def _kept(rid: str) -> Stored:
    found = _store().get(rid)
    if found is None:
        raise NotFoundError(f"Response with id '{rid}' not found.", param="response_id")
    return found


@responses_api.get("/v1/responses/<rid>")
def retrieve(rid: str) -> Response:
    return json_response(_kept(rid).response)


@responses_api.delete("/v1/responses/<rid>")
def delete(rid: str) -> Response:
    _kept(rid)
    _store().delete(rid)
    return json_response({"id": rid, "object": "response", "deleted": True})
