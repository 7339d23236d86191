"""Code completion: llama-server's ``/infill`` (llama.vim, llama.vscode): ``input_prefix``,
``input_suffix``, ``input_extra`` files and ``prompt`` in, ``content`` out, whole or streamed; and
Mistral's (Codestral's) ``/v1/fim/completions`` (Continue's "mistral" provider): ``prompt`` and
``suffix`` in, a chat completion out. The prompt is built by :mod:`localllm.core.fim`.

Example:
    >>> app.register_blueprint(code)                            # doctest: +SKIP
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from flask import Blueprint, Response, request

from localllm.core.request import Choice, Request
from localllm.errors import InvalidArgumentError, LocalLLMError
import localllm.server.protocol as protocol
import localllm.server.openai_format as fmt
from localllm.server.routes import generate
from localllm.server.web import account, answer, engine_for, event_stream, json_response, read_body, state

code = Blueprint("code", __name__)

# llama-server's sampling fields that /infill reads (one choice, no logprobs): the rest is ignored
_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty",
           "repeat_last_n", "seed", "stop", "grammar", "ignore_eos", "max_tokens")


def _params(body: dict[str, Any]) -> Any:
    """Sampling as llama-server reads it: ``n_predict`` (-1: until the end or the context is full)."""
    kw = {k: body[k] for k in _FIELDS if body.get(k) is not None}
    n_predict = body.get("n_predict")
    if n_predict is not None and "max_tokens" not in kw:
        if isinstance(n_predict, bool) or not isinstance(n_predict, int) or n_predict < -1:
            raise InvalidArgumentError("n_predict must be an integer, -1 for no limit", param="n_predict")
        kw["max_tokens"] = None if n_predict == -1 else n_predict
    return protocol.sampling(kw, default_max_tokens=None, chat=False)


def _required(body: dict[str, Any], key: str) -> str:
    v = body.get(key)
    if not isinstance(v, str):
        raise InvalidArgumentError(f"{key} is required (a string)" if v is None else f"{key} must be a string",
                                   param=key)
    return v


def _final(req: Request, c: Choice, model_id: str, content: str, eng: Any) -> dict[str, Any]:
    """The last object: llama-server's ``/completion`` result (``content`` is "" after a stream)."""
    stop_type = "limit" if c.finish_reason == "length" else "word" if c.stop_sequence is not None else "eos"
    t_end = req.t_end or time.perf_counter()
    t_first = req.t_first or t_end
    t_start = req.t_start or req.t_submit
    return {"index": 0, "content": content, "tokens": c.tokens, "id_slot": -1, "stop": True, "model": model_id,
            "tokens_predicted": req.completion_tokens, "tokens_evaluated": len(req.prompt),
            "prompt": eng.detokenize(req.prompt), "has_new_line": "\n" in c.text, "stop_type": stop_type,
            "stopping_word": c.stop_sequence or "", "tokens_cached": req.cached_tokens,
            "timings": {"prompt_n": len(req.prompt) - req.cached_tokens, "prompt_ms": (t_first - t_start) * 1e3,
                        "predicted_n": req.completion_tokens, "predicted_ms": (t_end - t_first) * 1e3}}


@code.post("/infill")
def infill() -> Response:
    """``{"input_prefix", "input_suffix", "input_extra"?: [{"filename", "text"}], "prompt"?, "n_predict"?,
    "stream"?, sampling...}`` → ``{"content", "stop_type", "tokens_predicted", ...}``."""
    body = read_body()
    eng = engine_for(body)
    params = _params(body)
    prompt = protocol.get_str(body, "prompt") or ""
    ids = eng.infill_ids(_required(body, "input_prefix"), _required(body, "input_suffix"), prompt=prompt,
                         extra=body.get("input_extra"), max_tokens=params.max_tokens)
    req = Request(ids, params, stream=protocol.get_bool(body, "stream", False))
    st = state()
    metrics, model_id = st.metrics, st.served_id(eng)
    eng.submit(req)
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")
    if not req.stream:
        c = answer(req)[0]
        return json_response(_final(req, c, model_id, c.text, eng))

    def events() -> Iterator[str]:
        c = Choice(0)
        try:
            for ev in req.events(disconnected=disconnected):
                if ev.kind == "text" and ev.text:
                    c.text += ev.text
                    yield _sse({"index": 0, "content": ev.text, "tokens": [], "stop": False, "id_slot": -1,
                                "tokens_predicted": req.completion_tokens, "tokens_evaluated": len(req.prompt)})
                elif ev.kind == "done":
                    c.finish_reason, c.tokens, c.stop_sequence = ev.finish_reason, ev.tokens, ev.stop_sequence
            yield _sse(_final(req, c, model_id, "", eng))
        except LocalLLMError as e:  # headers are gone: report in the stream, as llama-server does
            yield _sse(e.to_dict())
        finally:
            req.cancel()
            account(metrics, req)

    return event_stream(events(), None)


@code.post("/v1/fim/completions")
def fim_completions() -> Response:
    """Mistral's FIM API: ``{"model", "prompt", "suffix"?, "max_tokens"?, "stream"?, sampling...}`` → a chat
    completion (``choices[0].message.content``; streamed: ``delta.content`` in every chunk, as Mistral's)."""
    body = read_body()
    eng = engine_for(body)
    params = protocol.sampling(body, default_max_tokens=None, chat=True)
    stream, usage = protocol.stream_flags(body, params)
    ids = eng.infill_ids(_required(body, "prompt"), protocol.get_str(body, "suffix") or "",
                         max_tokens=params.max_tokens)
    req = Request(ids, params, stream=stream)
    if not stream or params.n > 1:
        return generate(eng, req, usage, chat=True)
    st = state()
    metrics, model_id, rid, created = st.metrics, st.served_id(eng), "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    eng.submit(req)
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")

    def events() -> Iterator[str]:
        try:
            yield fmt.sse(fmt.chunk(rid, created, model_id, True, 0, "", None, role=True, usage=usage))
            for ev in req.events(disconnected=disconnected):
                if ev.kind in ("text", "done") and (ev.text or ev.kind == "done"):
                    yield fmt.sse(fmt.chunk(rid, created, model_id, True, 0, ev.text, ev.finish_reason, usage=usage))
            if usage:
                yield fmt.sse(fmt.usage_chunk(rid, created, model_id, True, req))
            yield "data: [DONE]\n\n"
        except LocalLLMError as e:
            yield fmt.sse(e.to_dict())
        finally:
            req.cancel()
            account(metrics, req)

    return event_stream(events(), None)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
