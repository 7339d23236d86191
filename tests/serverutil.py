"""A live ``localllm serve`` app on a free loopback port, for tests."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from werkzeug.serving import make_server


@dataclass
class Live:
    url: str
    app: object

    @property
    def api(self) -> str:
        return self.url + "/v1"


@contextlib.contextmanager
def live_server(**settings: object) -> Iterator[Live]:
    """Start create_app(ServerSettings.create(**settings)) on 127.0.0.1:<free port> in a thread."""
    from localllm.server import ServerSettings, create_app, shutdown

    settings.setdefault("load_async", False)
    app = create_app(ServerSettings.create(**settings))
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, name="test-http", daemon=True)
    t.start()
    try:
        yield Live(f"http://127.0.0.1:{srv.server_port}", app)
    finally:
        srv.shutdown()
        t.join(timeout=5)
        shutdown(app)


def wait_for(cond, timeout: float = 5.0, interval: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(interval)
    return cond()


@dataclass
class Reply:
    status_code: int
    headers: dict
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        import json

        return json.loads(self.content)


def request(method: str, url: str, *, json=None, content: bytes | None = None, headers: dict | None = None,
            timeout: float = 60) -> Reply:
    """A plain HTTP request with the standard library (no client-side retries or checks)."""
    import json as _json
    import urllib.error
    import urllib.request

    hdrs = dict(headers or {})
    data = content
    if json is not None:
        data = _json.dumps(json).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Reply(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:
        return Reply(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def get(url: str, **kw) -> Reply:
    return request("GET", url, **kw)


def post(url: str, **kw) -> Reply:
    return request("POST", url, **kw)


@contextlib.contextmanager
def stream_lines(url: str, body: dict, headers: dict | None = None) -> Iterator[Iterator[str]]:
    """POST ``body`` and iterate the response's lines as they arrive; closing the
    context closes the connection (a client that goes away)."""
    import http.client
    import json as _json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", u.path, body=_json.dumps(body), headers={"Content-Type": "application/json",
                                                                   **(headers or {})})
    resp = conn.getresponse()

    def lines() -> Iterator[str]:
        while True:
            line = resp.readline()
            if not line:
                return
            yield line.decode().rstrip("\r\n")
    try:
        yield lines()
    finally:
        resp.close()
        conn.close()


@contextlib.contextmanager
def serve_process(*args: str, timeout: float = 120) -> Iterator[Live]:
    """``localllm serve ARGS --port <free>`` as a user starts it (a subprocess), ready when /health
    says ok; stopped with SIGTERM (its graceful drain) at the end. ``Live.app`` is the process."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "LOCALLLM_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "localllm", "serve", *args, "--port", str(port)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"localllm serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            return get(url + "/health", timeout=2).status_code == 200
        except OSError:
            return False

    try:
        if not wait_for(ready, timeout=timeout, interval=0.2):
            raise RuntimeError(f"localllm serve {' '.join(args)} was not ready in {timeout:g} s")
        yield Live(url, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        proc.stdout.close()
