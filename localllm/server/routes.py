"""The HTTP routes (a Flask blueprint): OpenAI-compatible endpoints, health,
metrics and the chat page. Each route reads its body, builds one core
:class:`~localllm.core.request.Request` and formats what comes back.

Example:
    >>> app.register_blueprint(api)                             # doctest: +SKIP
"""

from __future__ import annotations

import functools
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, request

from localllm import tools as toolsmod
from localllm.core.request import Request, collect
from localllm.errors import InvalidArgumentError, LocalLLMError, ModelNotFoundError
import localllm.server.openai_format as fmt
import localllm.server.protocol as protocol
from localllm.server.web import account, answer, engine_for, event_stream, json_response, read_body, state

STATIC = Path(__file__).resolve().parent.parent / "static"
api = Blueprint("api", __name__)










# ---------------------------------------------------------------------- plain endpoints
@api.get("/")
def index() -> Response:
    return Response(_page(), mimetype="text/html", headers={"Cache-Control": "no-cache"})


@functools.lru_cache(maxsize=1)
def _page() -> str:
    """chat.html with its vendored libraries (marked, DOMPurify; scripts/vendor_js.sh) inlined:
    one request, nothing from outside, and the API key's auth never stands in a script's way."""
    html = (STATIC / "chat.html").read_text(encoding="utf-8")
    libs = []
    for name in ("purify.min.js", "marked.umd.js"):
        js = (STATIC / "vendor" / name).read_text(encoding="utf-8")
        js = re.sub(r"//# sourceMappingURL=\S+", "", js).replace("</script", "<\\/script")
        libs.append(f"<script>{js}</script>")
    return html.replace("<!--VENDOR-->", "\n".join(libs), 1)


@api.get("/health")
def health() -> Response:
    st = state()
    eng = st.engine
    if eng is None:
        body: dict[str, Any] = {"status": "error" if st.load_error else "loading"}
        if st.load_error:
            body["error"] = str(st.load_error)
        return json_response(body, 503, {"Retry-After": "1"})
    if st.pool is not None:  # ready while the server runs: models load on first use
        return json_response({"status": "ok", "model": st.model_id, "models_loaded": sorted(st.pool.loaded)})
    now = eng.status()
    return json_response({"status": "ok", "model": st.model_id, "slots_idle": now.idle_slots,
                  "slots_processing": now.busy_slots, "queue": now.queue_depth})


@api.get("/metrics")
def metrics() -> Response:
    data, ctype = state().metrics.render()
    return Response(data, mimetype=ctype.split(";")[0], headers={"Content-Type": ctype})


def _card(model_id: str, info: Any) -> dict[str, Any]:
    """A model as ``/v1/models`` lists it, with its context window under the names clients read
    (OpenRouter's ``context_length``, vLLM's ``max_model_len``, LM Studio's ``max_context_length``)
    and its capabilities, so aider, litellm and Open WebUI do not have to guess."""
    return {"id": model_id, "object": "model", "created": state().created, "owned_by": "localllm",
            "context_length": info.context, "max_model_len": info.context, "max_context_length": info.context,
            "capabilities": list(info.capabilities), "meta": info.to_dict()}


def _model_card() -> dict[str, Any]:
    st = state()
    info = st.need_engine().info  # 503 while the model loads
    return _card(st.model_id, info)


def _pool_cards() -> list[dict[str, Any]]:
    """--all-models: every model in the store, whether loaded, and the loaded ones' info."""
    st = state()
    st.need_engine()  # 503 while the server starts
    cards = []
    for e in st.pool.catalog():
        entry = st.pool.loaded.get(e["id"]) if e["loaded"] else None
        card = {"id": e["id"], "object": "model", "created": st.created, "owned_by": "localllm"}
        if entry is not None:
            card = _card(e["id"], entry.engine.info)
        card["loaded"] = e["loaded"]
        cards.append(card)
    return cards


@api.get("/v1/models")
def models() -> Response:
    if state().pool is not None:
        return json_response({"object": "list", "data": _pool_cards()})
    return json_response({"object": "list", "data": [_model_card()]})


@api.get("/v1/models/<path:name>")
def model(name: str) -> Response:
    st = state()
    name = st.mapped(name) or name
    if st.pool is not None:
        found = [c for c in _pool_cards() if name in (c["id"], c["id"].split(":")[0])]
        if not found:
            raise ModelNotFoundError(f"model {name!r} is not in this server's store", param="model")
        return json_response(found[0])
    card = _model_card()
    if name not in st.aliases:
        raise ModelNotFoundError(f"model {name!r} is not served here (this server runs {st.model_id!r})",
                                 param="model")
    return json_response(card)


@api.post("/v1/embeddings")
def embeddings() -> Response:
    body = read_body()
    eng = engine_for(body)
    vectors, n = eng.embed(protocol.embedding_input(body))
    return json_response({"object": "list", "model": state().served_id(eng),
                  "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                  "usage": {"prompt_tokens": n, "total_tokens": n}})


# ---------------------------------------------------------------------- Anthropic's Messages API
@api.post("/v1/messages")
def anthropic_messages() -> Response:
    import localllm.server.anthropic_format as af

    body = read_body()
    eng = engine_for(body)
    params = af.sampling(body)
    msgs, system = af.messages(body)
    spec = af.tool_spec(body)
    params = toolsmod.with_grammar(params, spec, eng.tool_family)
    tools = (spec, eng.tool_family) if spec is not None and spec.active else None
    stream = protocol.get_bool(body, "stream", False)
    req = eng.chat_request(msgs, params, system=system, tools=spec, stream=stream)
    st = state()
    metrics = st.metrics
    eng.submit(req)
    mid, model_id = "msg_" + uuid.uuid4().hex[:24], st.served_id(eng)
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")
    if not stream:
        return json_response(af.message(mid, model_id, answer(req)[0], req, tools))

    def events() -> Iterator[str]:
        try:
            if tools is not None:  # the answer is parsed when it ends
                choice = collect(req.events(disconnected=disconnected), 1)[0]
                yield from af.tool_events(mid, model_id, choice, req, tools)
                return
            blocks = af.Blocks()
            started = False
            for ev in req.events(disconnected=disconnected):
                if not started:  # after the prompt is admitted: its usage says how much the cache held
                    started = True
                    yield from blocks.start(mid, model_id, req)
                if ev.kind in ("text", "reasoning") and ev.text:
                    yield from blocks.delta(ev.text, thinking=ev.kind == "reasoning")
                elif ev.kind == "done":
                    yield from blocks.end(ev.finish_reason, ev.stop_sequence, req)
        except LocalLLMError as e:  # headers are gone: report in the stream, as Anthropic does
            yield af.event("error", {"error": af.error_body(e)["error"]})
        finally:
            req.cancel()
            account(metrics, req)

    return event_stream(events(), None)


@api.post("/v1/messages/count_tokens")
def anthropic_count_tokens() -> Response:
    import localllm.server.anthropic_format as af

    body = read_body()
    eng = engine_for(body)
    msgs, system = af.messages(body)
    return json_response({"input_tokens": len(eng.chat_ids(msgs, system, af.tool_spec(body)))})


# ---------------------------------------------------------------------- tokens (llama-server's shapes)
@api.post("/tokenize")
def tokenize() -> Response:
    """``{"content": TEXT}`` or ``{"messages": [...]}`` (rendered with the chat template, as a chat
    completion would read it) → ``{"tokens": [...]}``; ``with_pieces`` gives ``[{"id", "piece"}]``."""
    body = read_body()
    eng = engine_for(body)
    if body.get("messages") is not None:
        if body.get("content") is not None:
            raise InvalidArgumentError("give content or messages, not both", param="messages")
        ids = eng.chat_ids(body["messages"])
    else:
        content = body.get("content")
        if not isinstance(content, str):
            raise InvalidArgumentError("content must be a string (or give messages)", param="content")
        ids = eng.tokenize(content, add_special=protocol.get_bool(body, "add_special", False),
                           parse_special=protocol.get_bool(body, "parse_special", True))
    if protocol.get_bool(body, "with_pieces", False):
        return json_response({"tokens": [{"id": t, "piece": eng.piece(t)} for t in ids]})
    return json_response({"tokens": ids})


@api.post("/detokenize")
def detokenize() -> Response:
    """``{"tokens": [ids]}`` → ``{"content": TEXT}``."""
    body = read_body()
    return json_response({"content": engine_for(body).detokenize(body.get("tokens"))})


# ---------------------------------------------------------------------- generation
@api.post("/v1/chat/completions")
def chat_completions() -> Response:
    body = read_body()
    eng = engine_for(body)
    params = protocol.sampling(body, default_max_tokens=None, chat=True)
    stream, usage = protocol.stream_flags(body, params)
    spec = toolsmod.spec_from(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    params = toolsmod.with_grammar(params, spec, eng.tool_family)
    req = eng.chat_request(body.get("messages"), params, tools=spec, stream=stream,
                           template_kwargs=body.get("chat_template_kwargs"))
    calls = (spec, eng.tool_family) if spec is not None and spec.active else None
    return generate(eng, req, usage, chat=True, tools=calls)


@api.post("/v1/completions")
def completions() -> Response:
    body = read_body()
    eng = engine_for(body)
    params = protocol.sampling(body, default_max_tokens=16, chat=False)
    stream, usage = protocol.stream_flags(body, params)
    if protocol.get_bool(body, "echo", False):
        raise InvalidArgumentError("echo is not supported", param="echo")
    text, suffix = protocol.completion_prompt(body), protocol.get_str(body, "suffix")
    if suffix is not None and (suffix or eng.has_fim):  # code completion: the model's FIM tokens
        if not isinstance(text, str):
            raise InvalidArgumentError("suffix needs a text prompt (the code before the cursor)", param="suffix")
        prompt = eng.infill_ids(text, suffix, max_tokens=params.max_tokens)
    else:
        prompt = eng.text_ids(text)
    return generate(eng, Request(prompt, params, stream=stream), usage, chat=False)




def generate(eng: Any, req: Request, include_usage: bool, chat: bool,
              tools: tuple[toolsmod.ToolSpec, str] | None = None) -> Response:
    st = state()
    eng.submit(req)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created, model_id = int(time.time()), st.served_id(eng)
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")

    metrics = st.metrics

    def counted() -> None:
        account(metrics, req)

    if not req.stream:
        return json_response(fmt.response(rid, created, model_id, chat, answer(req), req, tools))

    if tools is not None:  # a call is known only at the end: the answer comes in the final chunks
        return event_stream(fmt.tool_stream(rid, created, model_id, req, tools, include_usage, disconnected), counted)

    def events() -> Iterator[str]:
        try:
            if chat:
                for i in range(req.params.n):
                    yield fmt.sse(fmt.chunk(rid, created, model_id, chat, i, "", None, role=True, usage=include_usage))
            for ev in req.events(disconnected=disconnected):
                if ev.kind in ("text", "reasoning"):
                    yield fmt.sse(fmt.chunk(rid, created, model_id, chat, ev.index, ev.text, None, ev.logprobs,
                                            usage=include_usage, reasoning=ev.kind == "reasoning"))
                elif ev.kind == "done":
                    yield fmt.sse(fmt.chunk(rid, created, model_id, chat, ev.index, None if chat else "",
                                            ev.finish_reason, usage=include_usage))
            if include_usage:
                yield fmt.sse(fmt.usage_chunk(rid, created, model_id, chat, req))
            yield "data: [DONE]\n\n"
        except LocalLLMError as e:  # headers are gone: report in the stream
            yield fmt.sse(e.to_dict())
        finally:
            req.cancel()  # a client that went away frees its slot at the next step
            counted()

    return event_stream(events(), None)
