"""What every blueprint of the server shares: the app's state, the request's JSON body, the engine
a request names (after ``--alias`` patterns), JSON and event-stream responses, and a finished
request counted in the metrics.

Example:
    >>> json_response({"ok": True}).get_json()
    {'ok': True}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from localllm.core.request import Choice, Request, collect
from localllm.errors import InvalidArgumentError, LocalLLMError, ModelNotFoundError, PayloadTooLargeError
import localllm.server.openai_format as fmt
import localllm.server.protocol as protocol


def state() -> Any:
    return current_app.extensions["localllm"]


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), status=status, mimetype="application/json",
                    headers=headers)


def read_body() -> dict[str, Any]:
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise PayloadTooLargeError("the request body is too large") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        raise InvalidArgumentError("the request body is not valid JSON") from None
    return dict(protocol.check_object(body))


def engine_for(body: dict[str, Any]) -> Any:
    st = state()
    name = st.mapped(protocol.get_str(body, "model"))
    eng = st.need_engine(name)
    if st.pool is None and name and name not in st.aliases:
        raise ModelNotFoundError(f"model {name!r} is not served here (this server runs {st.model_id!r})",
                                 param="model")
    return eng


def account(m: Any, req: Request) -> None:
    """A finished request in the metrics ``m`` (captured in the route: a stream's generator
    runs after the request context is gone)."""
    m.prompt_tokens.inc(len(req.prompt))
    m.cached_tokens.inc(req.cached_tokens)
    m.generated_tokens.inc(req.completion_tokens)
    if req.t_first is not None:
        m.ttft.observe(req.t_first - req.t_submit)


def event_stream(chunks: Iterator[str], on_end: Callable[[], None] | None) -> Response:
    """Server-sent events; ``on_end`` runs when the stream ends, however it ends."""

    def guarded() -> Iterator[str]:
        try:
            yield from chunks
        except LocalLLMError as e:  # headers are gone: report in the stream
            yield fmt.sse(e.to_dict())
        finally:
            if on_end is not None:
                on_end()

    return Response(guarded() if on_end is not None else chunks, mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def answer(req: Request) -> list[Choice]:
    """A non-streamed request's finished choices, waited for in the route's thread (a client that
    goes away cancels it); the request is then cancelled (its slots freed) and counted in the metrics."""
    disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")
    metrics = state().metrics
    try:
        return collect(req.events(disconnected=disconnected), req.params.n)
    finally:
        req.cancel()
        account(metrics, req)
