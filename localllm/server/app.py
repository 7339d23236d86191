"""The Flask app: OpenAI-compatible endpoints over the batching scheduler.

Example:
    >>> app = create_app(ServerSettings(parallel=2))            # doctest: +SKIP
    >>> app.test_client().get("/health").status_code            # doctest: +SKIP
    503
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from flask import Flask, Response, request, send_from_directory
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from localllm.errors import (AuthenticationError, InvalidArgumentError, LocalLLMError, MethodNotAllowedError,
                             ModelNotFoundError, NotFoundError, PayloadTooLargeError, QueueFullError,
                             ServiceUnavailableError)
from localllm.server import protocol
from localllm.server.engine import Engine, ServerSettings
from localllm.server.metrics import Metrics
from localllm.server.scheduler import Job

log = logging.getLogger("localllm.server")
STATIC = Path(__file__).resolve().parent.parent / "static"
PUBLIC = ("/", "/health", "/favicon.ico")


class _State:
    """What one app holds: settings, metrics, and the engine once loaded."""

    def __init__(self, cfg: ServerSettings) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: LocalLLMError | None = None
        self.created = int(time.time())
        self.loaded = threading.Event()

    def load(self) -> None:
        try:
            eng = Engine(self.cfg, on_step=self.metrics.on_step)
            self.metrics.bind(lambda: eng.scheduler.stats["queue_depth"], eng.scheduler.busy_slots,
                              eng.scheduler.n_slots)
            self.engine = eng
            log.info("model %s loaded (%s sequences x %s tokens)", eng.model_id, self.cfg.parallel, eng.n_ctx)
        except LocalLLMError as e:
            log.error("could not load the model: %s", e)
            self.load_error = e
        except Exception as e:  # never leave /health loading forever
            log.exception("could not load the model")
            self.load_error = ServiceUnavailableError(f"the model failed to load: {e}")
        finally:
            self.loaded.set()

    def need_engine(self) -> Engine:
        if self.engine is None:
            if self.load_error is not None:
                raise ServiceUnavailableError(f"the model failed to load: {self.load_error}")
            raise ServiceUnavailableError("the model is still loading", retry_after=1)
        return self.engine


def _json_body() -> dict[str, Any]:
    try:
        raw = request.get_data(cache=True)
    except RequestEntityTooLarge:
        raise PayloadTooLargeError("the request body is too large") from None
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # ValueError covers bad UTF-8 and bad JSON
        raise InvalidArgumentError("the request body is not valid JSON") from None
    return dict(protocol.check_object(body))


def _error_response(e: LocalLLMError) -> Response:
    resp = Response(json.dumps(e.to_dict()), status=e.status, mimetype="application/json")
    if isinstance(e, (QueueFullError, ServiceUnavailableError)):
        resp.headers["Retry-After"] = str(getattr(e, "retry_after", 1))
    if isinstance(e, AuthenticationError):
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(cfg: ServerSettings | None = None) -> Flask:
    """A Flask app serving ``cfg.model``; the model loads in a background thread
    (``/health`` is 503 until it is ready) unless ``cfg.load_async`` is False.

    Example:
        >>> app = create_app(ServerSettings(model="smollm2-135m", parallel=2))  # doctest: +SKIP
    """
    cfg = cfg or ServerSettings()
    from localllm import store, validate

    # a wrong path or a bad file is the caller's mistake: fail now (cheap: the header
    # only), not later in the background where it would only show as a 503
    validate.read_header(store.resolve(cfg.model, models_dir=cfg.models_dir))
    app = Flask("localllm.server", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    state = _State(cfg)
    app.extensions["localllm"] = state
    if cfg.load_async:
        threading.Thread(target=state.load, name="localllm-load", daemon=True).start()
    else:
        state.load()
        if state.load_error is not None:
            raise state.load_error

    key = cfg.api_key.encode() if cfg.api_key else None

    # ------------------------------------------------------------------ cross-cutting
    def _cors(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and ("*" in cfg.cors_origins or origin in cfg.cors_origins):
            resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in cfg.cors_origins else origin
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
            resp.headers["Vary"] = "Origin"
        return resp

    @app.before_request
    def _auth() -> Response | None:
        if request.method == "OPTIONS":
            return _cors(Response(status=204))
        if key is None or request.path in PUBLIC:
            return None
        got = request.headers.get("Authorization", "")
        token = got[7:].strip() if got[:7].lower() == "bearer " else request.headers.get("X-Api-Key", "")
        # constant time: a timing side channel must not reveal how much of the key matched
        if not hmac.compare_digest(token.encode("utf-8", "replace"), key):
            raise AuthenticationError("invalid or missing API key (send 'Authorization: Bearer KEY')")
        return None

    @app.after_request
    def _after(resp: Response) -> Response:
        ep = request.endpoint or "unknown"
        state.metrics.requests.labels(endpoint=ep, status=str(resp.status_code)).inc()
        return _cors(resp)

    @app.errorhandler(LocalLLMError)
    def _on_error(e: LocalLLMError) -> Response:
        return _error_response(e)

    @app.errorhandler(HTTPException)
    def _on_http(e: HTTPException) -> Response:
        mapped: LocalLLMError
        if e.code == 413:
            mapped = PayloadTooLargeError(f"the request body is larger than {cfg.max_body_bytes} bytes")
        elif e.code == 404:
            mapped = NotFoundError(f"no such endpoint: {request.method} {request.path}")
        elif e.code == 405:
            mapped = MethodNotAllowedError(f"{request.method} is not allowed on {request.path}")
        else:
            mapped = InvalidArgumentError(e.description or str(e))
            mapped.status = e.code or 400
        return _error_response(mapped)

    @app.errorhandler(Exception)
    def _on_bug(e: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return _error_response(LocalLLMError(f"internal error: {type(e).__name__}"))

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/")
    def index() -> Response:
        return send_from_directory(STATIC, "chat.html", max_age=0)

    @app.get("/health")
    def health() -> Response:
        eng = state.engine
        if eng is None:
            body = {"status": "error" if state.load_error else "loading"}
            if state.load_error:
                body["error"] = str(state.load_error)
            return Response(json.dumps(body), status=503, mimetype="application/json",
                            headers={"Retry-After": "1"})
        sched = eng.scheduler
        busy = sched.busy_slots()
        return Response(json.dumps({"status": "ok", "model": eng.model_id, "slots_idle": sched.n_slots - busy,
                                    "slots_processing": busy, "queue": sched.stats["queue_depth"]}),
                        mimetype="application/json")

    @app.get("/metrics")
    def metrics() -> Response:
        data, ctype = state.metrics.render()
        return Response(data, mimetype=ctype.split(";")[0], headers={"Content-Type": ctype})

    def _model_card(eng: Engine) -> dict[str, Any]:
        return {"id": eng.model_id, "object": "model", "created": state.created, "owned_by": "localllm",
                "meta": eng.info}

    @app.get("/v1/models")
    def models() -> Response:
        eng = state.need_engine()
        return _jsonify({"object": "list", "data": [_model_card(eng)]})

    @app.get("/v1/models/<path:name>")
    def model(name: str) -> Response:
        eng = state.need_engine()
        if not eng.serves(name):
            raise ModelNotFoundError(f"model {name!r} is not served here (this server runs {eng.model_id!r})",
                                     param="model")
        return _jsonify(_model_card(eng))

    @app.post("/v1/embeddings")
    def embeddings() -> Response:
        body = _json_body()
        eng = _engine_for(body)
        texts = protocol.embedding_input(body)
        vectors, n = eng.embed(texts)
        return _jsonify({"object": "list", "model": eng.model_id,
                         "data": [{"object": "embedding", "index": i, "embedding": v}
                                  for i, v in enumerate(vectors)],
                         "usage": {"prompt_tokens": n, "total_tokens": n}})

    def _engine_for(body: dict[str, Any]) -> Engine:
        eng = state.need_engine()
        name = protocol.get_str(body, "model")
        if name and not eng.serves(name):
            raise ModelNotFoundError(f"model {name!r} is not served here (this server runs {eng.model_id!r})",
                                     param="model")
        return eng

    # ------------------------------------------------------------------ generation
    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        body = _json_body()
        eng = _engine_for(body)
        params = protocol.sampling(body, default_max_tokens=None, max_n=eng.scheduler.n_slots)
        stream, usage = protocol.stream_flags(body, params)
        prompt = eng.chat_prompt(body.get("messages"))
        return _generate(eng, prompt, params, stream, usage, chat=True)

    @app.post("/v1/completions")
    def completions() -> Response:
        body = _json_body()
        eng = _engine_for(body)
        params = protocol.sampling(body, default_max_tokens=16, max_n=eng.scheduler.n_slots)
        stream, usage = protocol.stream_flags(body, params)
        prompt = eng.text_prompt(protocol.completion_prompt(body, eng.model.n_vocab))
        if protocol.get_bool(body, "echo", False):
            raise InvalidArgumentError("echo is not supported", param="echo")
        return _generate(eng, prompt, params, stream, usage, chat=False)

    def _generate(eng: Engine, prompt: list[int], params: Any, stream: bool, include_usage: bool,
                  chat: bool) -> Response:
        job = eng.scheduler.submit(Job(prompt, params, stream=stream))
        m = state.metrics
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        disconnected: Callable[[], bool] | None = request.environ.get("waitress.client_disconnected")

        def usage() -> dict[str, Any]:
            return {"prompt_tokens": len(prompt), "completion_tokens": job.completion_tokens,
                    "total_tokens": len(prompt) + job.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": job.cached_tokens}}

        def account() -> None:
            m.prompt_tokens.inc(len(prompt))
            m.cached_tokens.inc(job.cached_tokens)
            m.generated_tokens.inc(job.completion_tokens)
            if job.t_first is not None:
                m.ttft.observe(job.t_first - job.t_submit)

        if not stream:
            texts = [""] * params.n
            reasons: list[str | None] = [None] * params.n
            try:
                for ev in job.events(disconnected=disconnected):
                    if ev.kind == "text":
                        texts[ev.index] += ev.text
                    elif ev.kind == "done":
                        reasons[ev.index] = ev.finish_reason
            finally:
                job.cancel()
                account()
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": t},
                            "logprobs": None, "finish_reason": reasons[i]} for i, t in enumerate(texts)]
            else:
                choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": reasons[i]}
                           for i, t in enumerate(texts)]
            return _jsonify({"id": rid, "object": obj, "created": created, "model": eng.model_id,
                             "choices": choices, "usage": usage()})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                          "finish_reason": finish}
            else:
                choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            return {"id": rid, "object": chunk_obj, "created": created, "model": eng.model_id,
                    "choices": [choice]}

        def events() -> Iterator[str]:
            try:
                if chat:
                    for i in range(params.n):
                        yield _sse(chunk(i, "", None, role=True))
                for ev in job.events(disconnected=disconnected):
                    if ev.kind == "text":
                        yield _sse(chunk(ev.index, ev.text, None))
                    elif ev.kind == "done":
                        yield _sse(chunk(ev.index, None if chat else "", ev.finish_reason))
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": eng.model_id,
                                "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            except LocalLLMError as e:  # headers are gone: report in the stream
                yield _sse(e.to_dict())
            finally:
                job.cancel()  # a client that went away frees its slot at the next step
                account()

        return Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def make_app(**settings: Any) -> Flask:
    """``create_app(ServerSettings(**settings))`` for WSGI servers that take a call
    string with literal arguments; ``api_key`` defaults to ``$LOCALLLM_API_KEY``.

    Example:
        gunicorn -w 1 -k gthread --threads 32 'localllm.server:make_app(model="smollm2-135m")'
    """
    import os

    settings.setdefault("api_key", os.environ.get("LOCALLLM_API_KEY") or None)
    if "cors_origins" in settings:
        settings["cors_origins"] = tuple(settings["cors_origins"])
    return create_app(ServerSettings(**settings))


def _jsonify(obj: Any) -> Response:
    return Response(json.dumps(obj, ensure_ascii=False), mimetype="application/json")


def shutdown(app: Flask) -> None:
    """Stop the scheduler and free the model of an app made by :func:`create_app`."""
    state: _State = app.extensions["localllm"]
    state.loaded.wait(timeout=120)
    if state.engine is not None:
        state.engine.close()
        state.engine = None
