"""``localllm serve [MODEL]``: the OpenAI-compatible server and chat page."""

from __future__ import annotations

import ipaddress
import logging
from typing import TYPE_CHECKING

import click

from localllm.cli.options import ByteSize, model_options, model_settings

if TYPE_CHECKING:
    from flask import Flask

    from localllm.server import ServerSettings


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.argument("model", required=False)
@click.option("--model-path", type=click.Path(dir_okay=False), default=None, help="A .gguf file to serve.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True)
@click.option("--api-key", envvar="LOCALLLM_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' (env LOCALLLM_API_KEY).")
@click.option("--parallel", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Sequences decoded together (slots).")
@click.option("--max-queue", type=click.IntRange(0), default=16, show_default=True,
              help="Requests that may wait for a slot; beyond that the answer is 503.")
@click.option("--cors-origin", "cors_origins", multiple=True, help="Allowed browser origin (repeatable, or '*').")
@click.option("--max-body", "max_body_bytes", type=click.IntRange(1024), default=4 << 20, show_default=True,
              help="Largest request body in bytes (413 beyond).")
@click.option("--repack/--no-repack", default=True, show_default=True,
              help="llama.cpp's repacked weights (faster Q4_0/Q4_K on AVX2). --no-repack uses the same "
                   "kernel for every batch size (see docs/serve.md).")
@click.option("--drain-timeout", type=click.FloatRange(0), default=20.0, show_default=True,
              help="On SIGTERM: refuse new requests (503) and give those in flight this many seconds to "
                   "finish, then exit 0.")
@click.option("--all-models", is_flag=True,
              help="Serve every model in the store: a request names one (NAME[:VERSION]); it loads on first use. "
                   "MODEL is the one loaded at start and used when a request names none.")
@click.option("--max-memory", type=ByteSize(), default=None,
              help="With --all-models: memory for loaded models, e.g. 4G (default: 80%% of the RAM available). "
                   "The least recently used idle model is unloaded to make room.")
@click.option("--keep-alive", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --all-models: unload a model idle for this many seconds.")
@click.option("--alias", "aliases", multiple=True, metavar="NAME | PATTERN=MODEL",
              help="NAME: the model id clients see (default NAME:VERSION). PATTERN=MODEL (repeatable): requests "
                   "for a model matching the glob PATTERN go to MODEL, e.g. 'claude-*=smollm2-135m' for "
                   "Claude Code; without --all-models MODEL must be the served model.")
@click.option("--insecure", is_flag=True, help="Allow binding a non-loopback address without --api-key.")
@click.option("--server", "server_kind", type=click.Choice(["auto", "waitress", "werkzeug"]), default="auto",
              show_default=True, help="HTTP server (waitress when installed).")
@model_options
def command(model: str | None, model_path: str | None, host: str, port: int, api_key: str | None,
            parallel: int, max_queue: int, cors_origins: tuple[str, ...], max_body_bytes: int, repack: bool, insecure: bool,
            drain_timeout: float, all_models: bool, max_memory: int | None, keep_alive: float | None,
            aliases: tuple[str, ...], server_kind: str, n_ctx: int | None, n_threads: int | None, gpu_layers: int | str,
            gpu_memory: int | None, models_dir: str | None, cache_type_k: str, cache_type_v: str, flash_attn: str,
            prompt_cache: bool, speculate: str, prefill: str, mmap: bool | None) -> None:
    """Serve MODEL (a name or .gguf path; the default model if omitted) on http://HOST:PORT.

    \b
    OpenAI API under /v1, a chat page at /, /health and /metrics.
    --ctx is the context of each of the --parallel sequences.
    """
    from localllm.server import ServerSettings, create_app

    if model and model_path:
        raise click.UsageError("give either MODEL or --model-path, not both")
    if not all_models and (max_memory is not None or keep_alive is not None):
        raise click.UsageError("--max-memory and --keep-alive need --all-models")
    if not _is_loopback(host) and not api_key:
        if not insecure:
            raise click.UsageError(f"binding {host} exposes the server without authentication: "
                                   "pass --api-key KEY, or --insecure if you really mean it")
        click.echo(f"warning: serving on {host} WITHOUT an API key: anyone who can reach this port "
                   "can use the model", err=True)
    model_alias, model_map = _aliases(aliases)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = ServerSettings(model=model_settings(model_path or model, n_ctx, n_threads, gpu_layers,
                                              cache_type_k, cache_type_v, flash_attn, prompt_cache, mmap,
                                              repack=repack, n_seq=parallel, gpu_memory=gpu_memory,
                                              speculate=speculate, prefill=prefill),
                         models_dir=models_dir, host=host, port=port, api_key=api_key, max_queue=max_queue, cors_origins=cors_origins,
                         max_body_bytes=max_body_bytes, model_alias=model_alias, model_map=model_map,
                         drain_timeout=drain_timeout,
                         all_models=all_models, max_memory=max_memory, keep_alive=keep_alive)
    app = create_app(cfg)
    serve_app(app, cfg, server_kind, parallel, max_queue)


def _aliases(values: tuple[str, ...]) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """--alias values → (the model id clients see, the PATTERN=MODEL map)."""
    ids = [v for v in values if "=" not in v]
    if len(ids) > 1:
        raise click.UsageError(f"--alias NAME names the served model once (got {', '.join(ids)}); "
                               "use PATTERN=MODEL to map other names")
    pairs = [tuple(v.split("=", 1)) for v in values if "=" in v]
    for pattern, target in pairs:
        if not pattern.strip() or not target.strip():
            raise click.UsageError(f"--alias {pattern}={target}: give PATTERN=MODEL, both non-empty")
    return (ids[0] if ids else None), tuple((p.strip(), t.strip()) for p, t in pairs)


def _exit_if_the_load_fails(app: Flask) -> None:
    """A model that passes the header check but that llama.cpp cannot load ends the
    command with its one-line error and exit 1: never a server that answers 503 forever."""
    import os
    import threading

    state = app.extensions["localllm"]

    def watch() -> None:
        state.loaded.wait()
        e = state.load_error
        if e is not None:
            click.echo(f"error: {e.message}" + (f" (next: {e.hint})" if e.hint else ""), err=True)
            os._exit(1)  # the model never loaded: nothing to free; waitress holds the main thread

    threading.Thread(target=watch, name="localllm-load-watch", daemon=True).start()


def _drain_on_sigterm(app: Flask, timeout: float) -> None:
    """SIGTERM (``docker stop``, Kubernetes) stops the server gracefully: new requests get 503,
    those in flight get ``timeout`` seconds to finish, then the server stops as on Ctrl-C (exit 0)."""
    import os
    import signal
    import threading
    import time

    from localllm.server import drain

    state = app.extensions["localllm"]
    if threading.current_thread() is not threading.main_thread():
        return

    def stop() -> None:
        if not drain(app, timeout):
            click.echo(f"localllm serve: {state.inflight} request(s) still running after {timeout:g} s: "
                       "stopping anyway", err=True)
        time.sleep(0.5)  # let the server write the last bytes of the responses that just ended
        os.kill(os.getpid(), signal.SIGINT)  # the HTTP server's own way out (KeyboardInterrupt)

    def on_term(signum: int, frame: object) -> None:
        if state.draining.is_set():
            return
        state.draining.set()
        # the way out is SIGINT, which a shell ignores in background jobs (`localllm serve &`): restore it
        signal.signal(signal.SIGINT, signal.default_int_handler)
        click.echo(f"localllm serve: SIGTERM: finishing {state.inflight} request(s) in flight "
                   f"(at most {timeout:g} s), then stopping", err=True)
        threading.Thread(target=stop, name="localllm-drain", daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)


def serve_app(app: Flask, cfg: ServerSettings, server_kind: str, parallel: int, max_queue: int) -> None:
    """Run ``app`` under waitress (or werkzeug) until interrupted, then free the model."""
    from localllm.server import shutdown

    _drain_on_sigterm(app, cfg.drain_timeout)
    host, port = cfg.host, cfg.port
    url = f"http://{'localhost' if _is_loopback(host) else host}:{port}/"
    click.echo(f"localllm serve: {url} (OpenAI API at {url}v1, Ctrl-C stops)", err=True)
    # after the banner: a load that already failed must end the output with its error, not with the banner
    _exit_if_the_load_fails(app)
    use_waitress = server_kind == "waitress"
    if server_kind == "auto":
        try:
            import waitress  # noqa: F401
            use_waitress = True
        except ImportError:
            use_waitress = False
    try:
        if use_waitress:
            import waitress

            # one process (the model and its KV cache live in it), threads for connections
            # waitress reads a whole body (to a temporary file) before the app sees it, up to its own
            # limit, 1 GiB: a chunked body (no Content-Length) was refused only after that. A few times
            # --max-body, so that a body a little too large still gets the app's JSON 413 (waitress
            # closes the connection on larger ones, often before the client has sent it all)
            waitress.serve(app, host=host, port=port, threads=max(8, parallel + max_queue + 4),
                           channel_timeout=600, ident="localllm", max_request_body_size=4 * cfg.max_body_bytes)
        else:
            from werkzeug.serving import run_simple

            run_simple(host, port, app, threaded=True, use_reloader=False)
    finally:
        shutdown(app)
