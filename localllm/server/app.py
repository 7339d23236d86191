"""The app factory: settings, the loaded engine, auth, CORS and errors.
Routes live in :mod:`.routes` (a blueprint), response shapes in :mod:`.openai_format`.

Example:
    >>> cfg = ServerSettings.create(model="smollm2-135m", parallel=2, ctx=1024)
    >>> (cfg.model.n_seq, cfg.model.n_ctx, cfg.port)
    (2, 1024, 7860)
    >>> app = create_app(cfg)                                   # doctest: +SKIP
    >>> app.test_client().get("/health").status_code            # doctest: +SKIP
    503
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from localllm.errors import (AuthenticationError, InvalidArgumentError, LocalLLMError, MethodNotAllowedError,
                             NotFoundError, PayloadTooLargeError, QueueFullError, ServiceUnavailableError)
from localllm.loader import ModelSettings
from localllm.server.metrics import Metrics
from localllm.server.responses_store import ResponseStore

log = logging.getLogger("localllm.server")
PUBLIC = ("/", "/health", "/favicon.ico")

# ServerSettings.create's short names for ModelSettings fields (the CLI's flag names)
_MODEL_ALIASES = {"ctx": "n_ctx", "threads": "n_threads", "gpu_layers": "n_gpu_layers", "parallel": "n_seq"}


@dataclass(frozen=True)
class ServerSettings:
    """How to serve: the model's settings (``model.n_seq`` is ``--parallel``,
    ``model.n_ctx`` the context of each sequence) and the server's own options."""

    model: ModelSettings = field(default_factory=ModelSettings)   # its ``model``: a name or a path (resolved here)
    models_dir: str | None = None  # the store names are looked up in (default: settings.models_dir())
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    max_queue: int = 16
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    model_alias: str | None = None
    # (pattern, model): a request naming a model that matches the glob pattern is served by model
    # (``serve --alias 'claude-*-haiku-*=NAME'``: clients such as Claude Code ask for their own names)
    model_map: tuple[tuple[str, str], ...] = ()
    load_async: bool = True  # /health answers 503 while the model loads
    drain_timeout: float = 20.0  # SIGTERM: how long requests in flight may take to finish
    all_models: bool = False  # serve every model in the store, each loaded on first use (localllm.server.pool)
    max_memory: int | None = None  # the pool's budget in bytes (default: 80 % of the RAM available at start)
    keep_alive: float | None = None  # the pool unloads a model idle for this many seconds
    responses_max_stored: int = 256  # /v1/responses kept for previous_response_id (the oldest goes first)
    responses_max_age: float = 3600.0  # ... and for at most this many seconds

    @classmethod
    def create(cls, **kw: Any) -> ServerSettings:
        """Both kinds of settings from one flat set of keywords (``parallel=4, ctx=2048, port=...``)."""
        model_fields = {f.name for f in dataclasses.fields(ModelSettings)}
        mkw: dict[str, Any] = {}
        for k in list(kw):
            name = _MODEL_ALIASES.get(k, k)
            if name in model_fields and not (k == "model" and isinstance(kw[k], ModelSettings)):
                mkw[name] = kw.pop(k)
        if "cors_origins" in kw:
            kw["cors_origins"] = tuple(kw["cors_origins"])
        if "model_map" in kw:
            kw["model_map"] = tuple((str(p), str(m)) for p, m in dict(kw["model_map"]).items()) \
                if isinstance(kw["model_map"], dict) else tuple(tuple(x) for x in kw["model_map"])
        return cls(model=kw.pop("model", None) or ModelSettings(**mkw), **kw)


class State:
    """What one app holds: settings, metrics, and the engine once loaded."""

    def __init__(self, cfg: ServerSettings, prepared: Any = None) -> None:
        from localllm.core.engine import Engine

        self.cfg = cfg
        self.prepared = prepared  # loader.Prepared of the one model (None with --all-models)
        self.metrics = Metrics()
        self.engine: Engine | None = None
        self.load_error: LocalLLMError | None = None
        self.created = int(time.time())
        self.loaded = threading.Event()
        self.aliases: set[str] = set()
        self.draining = threading.Event()  # set by drain(): new requests get 503
        self.idle = threading.Condition()
        self.inflight = 0  # requests whose response is not closed yet (a stream until its end)
        self.pool: Any = None  # a ModelPool with --all-models
        self.responses = ResponseStore(cfg.responses_max_stored, cfg.responses_max_age)

    def enter(self) -> None:
        with self.idle:
            self.inflight += 1

    def leave(self) -> None:
        with self.idle:
            self.inflight -= 1
            self.idle.notify_all()

    def load(self) -> None:
        from localllm.core.engine import Engine

        try:
            if self.cfg.all_models:
                eng = self._start_pool()
            else:  # prepared once, in create_app: resolve, header and placement are not done again
                eng = Engine(self.prepared.settings, threaded=True, max_queue=self.cfg.max_queue,
                             on_step=self.metrics.on_step, prepared=self.prepared)
            self.metrics.watch(eng.status)
            for note in eng.notes:
                log.warning("%s", note)
            info = eng.info
            self.model_id = self.cfg.model_alias or info.id
            path = Path(info.path)
            self.aliases = {self.model_id, self.model_id.split(":")[0], info.id, info.path, info.name, path.stem,
                            path.name, str(self.cfg.model.model or "")} - {""}
            self.engine = eng
            log.info("model %s loaded (%s sequences x %s tokens, %s GPU layers)", self.model_id, info.sequences,
                     info.context, info.gpu_layers)
        except LocalLLMError as e:
            log.error("could not load the model: %s", e)
            self.load_error = e
        except Exception as e:  # never leave /health loading forever
            log.exception("could not load the model")
            self.load_error = ServiceUnavailableError(f"the model failed to load: {e}")
        finally:
            self.loaded.set()

    def _start_pool(self) -> Any:
        """--all-models: the pool, with the default model (or MODEL) loaded now."""
        from localllm import hardware
        from localllm.server.pool import ModelPool

        budget = self.cfg.max_memory or int(0.8 * hardware.memory()["available"])
        self.pool = ModelPool(self.cfg.model, max_memory=budget, keep_alive=self.cfg.keep_alive,
                              max_queue=self.cfg.max_queue, on_step=self.metrics.on_step,
                              models_dir=self.cfg.models_dir)
        eng = self.pool.get(str(self.cfg.model.model) if self.cfg.model.model else None)
        if self.cfg.keep_alive is not None:
            self.pool.start_reaper()
        return eng

    def mapped(self, name: str | None) -> str | None:
        """A request's ``model`` after ``--alias PATTERN=MODEL`` (the first pattern that matches)."""
        import fnmatch

        if name and name not in self.aliases:
            for pattern, target in self.cfg.model_map:
                if fnmatch.fnmatchcase(name, pattern):
                    return target
        return name

    def need_engine(self, name: str | None = None) -> Any:
        """The engine for a request's ``model`` (with --all-models: loaded on first use)."""
        name = self.mapped(name)
        if self.engine is None:
            if self.load_error is not None:
                raise ServiceUnavailableError(f"the model failed to load: {self.load_error}")
            raise ServiceUnavailableError("the model is still loading", retry_after=1)
        if self.pool is not None:
            default = str(self.cfg.model.model) if self.cfg.model.model else None
            return self.pool.get(default if not name or name in self.aliases else name)
        return self.engine

    def served_id(self, eng: Any) -> str:
        """The model id a response names."""
        return eng.info.id if self.pool is not None and eng is not self.engine else self.model_id


def error_response(e: LocalLLMError) -> Response:
    """The error in the shape of the API that was called: Anthropic's under /v1/messages, else OpenAI's."""
    if request.path.startswith("/v1/messages"):
        from localllm.server.anthropic_format import error_body

        body = error_body(e)
    else:
        body = e.to_dict()
    resp = Response(json.dumps(body), status=e.status, mimetype="application/json")
    if isinstance(e, (QueueFullError, ServiceUnavailableError)):
        resp.headers["Retry-After"] = str(getattr(e, "retry_after", 1))
    if isinstance(e, AuthenticationError):
        resp.headers["WWW-Authenticate"] = "Bearer"
    return resp


def _install_hooks(app: Flask, cfg: ServerSettings, state: State) -> None:
    key = cfg.api_key.encode() if cfg.api_key else None

    def cors(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if origin and ("*" in cfg.cors_origins or origin in cfg.cors_origins):
            resp.headers["Access-Control-Allow-Origin"] = "*" if "*" in cfg.cors_origins else origin
            resp.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
            resp.headers["Access-Control-Allow-Methods"] = "GET, POST, DELETE, OPTIONS"
            resp.headers["Vary"] = "Origin"
        return resp

    @app.before_request
    def _auth() -> Response | None:
        if state.draining.is_set():  # a load balancer reads /health; everyone else is told to go elsewhere
            if request.path == "/health":
                return Response(json.dumps({"status": "shutting_down"}), status=503, mimetype="application/json",
                                headers={"Retry-After": "1"})
            raise ServiceUnavailableError("the server is shutting down", retry_after=1)
        if request.method == "OPTIONS":
            return cors(Response(status=204))
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
        state.metrics.requests.labels(endpoint=request.endpoint or "unknown", status=str(resp.status_code)).inc()
        return cors(resp)

    @app.errorhandler(LocalLLMError)
    def _on_error(e: LocalLLMError) -> Response:
        return error_response(e)

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
        return error_response(mapped)

    @app.errorhandler(Exception)
    def _on_bug(e: Exception) -> Response:
        log.exception("unhandled error on %s", request.path)
        return error_response(LocalLLMError(f"internal error: {type(e).__name__}"))


def _merge_slashes(app: Flask) -> None:
    """``/v1//models`` is ``/v1/models``: clients that join a base URL ending in ``/`` with a path
    starting with one (Open WebUI, some editors) send a double slash. Werkzeug would answer a
    redirect, which a POST client does not follow, so the path is cleaned before routing."""
    inner = app.wsgi_app

    def merged(environ: Any, start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if "//" in path:
            environ["PATH_INFO"] = re.sub(r"/{2,}", "/", path)
        return inner(environ, start_response)

    app.wsgi_app = merged  # type: ignore[method-assign]


def _count_inflight(app: Flask, state: State) -> None:
    """Count each request from its arrival until the server closes its response (a stream's last chunk)."""
    from werkzeug.wsgi import ClosingIterator

    inner = app.wsgi_app

    def counted(environ: Any, start_response: Any) -> Any:
        state.enter()
        try:
            body = inner(environ, start_response)
        except BaseException:
            state.leave()
            raise
        return ClosingIterator(body, [state.leave])

    app.wsgi_app = counted  # type: ignore[method-assign]


def drain(app: Flask, timeout: float) -> bool:
    """Stop taking requests (503, and ``/health`` says ``shutting_down``) and wait up to ``timeout``
    seconds for those in flight to finish; True when none is left."""
    state: State = app.extensions["localllm"]
    state.draining.set()
    with state.idle:
        return state.idle.wait_for(lambda: state.inflight <= 0, timeout=timeout)


def _prepare(cfg: ServerSettings) -> Any:
    """The one model's name resolved (this door's job) and its header read and placed, once;
    with --all-models, only the name is checked (the pool loads on first use)."""
    from localllm import loader, resolve

    notes: list[str] = []
    path = resolve.resolve(cfg.model.model, models_dir=cfg.models_dir, notes=notes)
    for note in notes:
        log.warning("%s", note)
    settings = dataclasses.replace(cfg.model, model=path)
    for pattern, target in cfg.model_map:
        _check_mapping(pattern, target, path if not cfg.all_models else None, cfg.models_dir)
    return None if cfg.all_models else loader.prepare(settings)


def _check_mapping(pattern: str, target: str, served: Path | None, models_dir: str | None) -> None:
    """``--alias PATTERN=MODEL`` must name a model this server can serve: with one model, that model."""
    from localllm import resolve

    if not pattern or not target:
        raise InvalidArgumentError(f"--alias {pattern}={target}: give PATTERN=MODEL, both non-empty",
                                   param="alias")
    path = resolve.resolve(target, models_dir=models_dir)
    if served is not None and Path(path).resolve() != Path(served).resolve():
        raise InvalidArgumentError(f"--alias {pattern}={target}: this server serves {served.name} only",
                                   param="alias", hint=f"map the pattern to the served model, or serve "
                                                       f"--all-models to reach {target}")


def create_app(cfg: ServerSettings | None = None) -> Flask:
    """A Flask app serving ``cfg.model``; the model loads in a background thread
    (``/health`` is 503 until it is ready) unless ``cfg.load_async`` is False.

    Example:
        >>> app = create_app(ServerSettings.create(model="smollm2-135m", parallel=2))  # doctest: +SKIP
    """
    from localllm.server.responses_routes import responses_api
    from localllm.server.infill import code
    from localllm.server.rerank import ranking
    from localllm.server.routes import api

    cfg = cfg or ServerSettings()
    # a wrong name, path or a bad file is the caller's mistake: fail now (cheap: the header
    # only), not later in the background where it would only show as a 503
    prepared = _prepare(cfg)
    app = Flask("localllm.server", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    state = State(cfg, prepared)
    app.extensions["localllm"] = state
    _install_hooks(app, cfg, state)
    _count_inflight(app, state)
    _merge_slashes(app)
    app.register_blueprint(api)
    app.register_blueprint(responses_api)
    app.register_blueprint(code)
    app.register_blueprint(ranking)
    if cfg.load_async:
        threading.Thread(target=state.load, name="localllm-load", daemon=True).start()
    else:
        state.load()
        if state.load_error is not None:
            raise state.load_error
    return app


def make_app(**settings: Any) -> Flask:
    """``create_app(ServerSettings.create(**settings))`` for WSGI servers that take a
    call string with literal arguments; ``api_key`` defaults to ``$LOCALLLM_API_KEY``.

    Example:
        gunicorn -w 1 -k gthread --threads 32 'localllm.server:make_app(model="smollm2-135m")'
    """
    import os

    settings.setdefault("api_key", os.environ.get("LOCALLLM_API_KEY") or None)
    return create_app(ServerSettings.create(**settings))


def shutdown(app: Flask) -> None:
    """Stop the scheduler and free the model of an app made by :func:`create_app`."""
    state: State = app.extensions["localllm"]
    state.loaded.wait(timeout=120)
    if state.pool is not None:  # every model it loaded, the first one included
        state.pool.close()
        state.engine = None
    if state.engine is not None:
        state.engine.close()
        state.engine = None
