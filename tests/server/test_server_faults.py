"""``localllm serve`` as a real process (waitress) on loopback, under load, faults and abuse.

Each case is a row of docs/RELIABILITY.md (``LOCALLLM_REGEN=1`` rewrites the
table). The server serves a private copy of the default model, so a case may
delete or replace its file. Answers are greedy, so "a correct answer" is the
answer the same request got alone. ``-m soak`` adds a long mixed soak.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port, metric
from tests.reliability_doc import Cases
from tests.serverutil import get, post, wait_for

psutil = pytest.importorskip("psutil")

CTX = 256
CASES = Cases("server-faults", "tests/test_server_faults.py", "Servers under load, faults and abuse", (
    "`localllm serve` (waitress, `--parallel 2 --max-queue 6 --ctx 256`) runs as its own process on loopback, "
    "serving a private copy of the default model; every answer is greedy and compared with the same request "
    "alone."), {
    "load-32": ("32 concurrent clients, 3 rounds of one request each (chat or streamed completion, "
                "`max_tokens` 4)",
                "every request: 200 with the answer it gets alone, or 503 `server_busy` with `Retry-After`; "
                "never a reset or a 5xx; the process lives"),
    "load-rss": ("RSS of the server after rounds 2 and 3 of the load",
                 "round 3 within 24 MiB + 5 % of round 2"),
    "disconnect": ("2 streams (all slots, up to the context's end) read 3 lines each, then the clients reset "
                   "their connections", "both slots free within 30 s, having generated under 120 tokens in all "
                   "(not the ~500 to the end); the next request gets the right answer"),
    "slow-reader": ("a stream (48 tokens) into a 4 KiB receive buffer, unread while 3 other requests are answered, then read",
                    "others are served meanwhile; the stream ends with `[DONE]` and equals the answer unstreamed"),
    "file-deleted": ("the served .gguf is deleted", "the same answers (llama.cpp keeps its mapping)"),
    "file-replaced": ("another model is renamed onto the served path", "the same answers, the same model id"),
    "sigterm": ("SIGTERM with a stream (80 tokens) and a request (40 tokens) in flight",
                "both finish whole; new requests get 503 `unavailable` (or a refused connection); "
                "`/health` is 503 `shutting_down`; exit 0"),
    "sigterm-timeout": ("SIGTERM with `--drain-timeout 1` and a stream that would run for minutes",
                        "the stream is cut, the process exits 0 within 60 s"),
    "body-413": ("a 2 MiB body with `--max-body 1048576`", "413 `payload_too_large`"),
    "chunked-413": ("a chunked body (no Content-Length) of up to 64 MiB",
                    "refused after at most 16 MiB were sent (`--max-body` x 4; waitress spooled up to 1 GiB to disk first)"),
    "nested-json": ("`[` x 100000 and `{\"a\":` x 50000", "400 `invalid_argument`, not a RecursionError 500"),
    "huge-max-tokens": ("`max_tokens` 10^12 after a 200-token prompt", "200, prompt and answer within the context"),
    "huge-n": ("`n` 10^9, `best_of` 10^5, `num_beams` 10^4", "400 naming the field"),
    "huge-logit-bias": ("`logit_bias` with 20000 entries", "400 naming `logit_bias`"),
    "header-flood": ("10000 headers; one 2 MiB header", "answered (200) or 431; the process lives"),
    "abuse-rss": ("RSS before and after all the abuse above", "within 64 MiB"),
})
covers = CASES.covers

Q = [{"role": "user", "content": "Name a color."}]
PROMPT = "The capital of France is"


# ---------------------------------------------------------------------------------------- the server process

@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path
    model_path: Path

    @property
    def api(self) -> str:
        return self.url + "/v1"

    @property
    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def alive(self) -> None:
        assert self.proc.poll() is None, f"the server died (rc {self.proc.returncode}):\n{self.log.read_text()[-3000:]}"


@contextlib.contextmanager
def serve(model_path: Path, tmp: Path, *args: str) -> Iterator[Server]:
    port = free_port()
    log = tmp / f"serve-{port}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "localllm", "serve", "--model-path", str(model_path),
                                 "--port", str(port), "--parallel", "2", "--max-queue", "6", "--ctx", str(CTX),
                                 "--server", "waitress", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                # as a background job of a shell (`localllm serve &`): SIGINT ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
                                env={k: v for k, v in os.environ.items() if k != "LOCALLLM_API_KEY"})
    s = Server(proc, f"http://127.0.0.1:{port}", log, model_path)
    try:
        def up() -> bool:
            s.alive()
            try:
                return get(s.url + "/health", timeout=5).status_code == 200
            except OSError:
                return False
        assert wait_for(up, timeout=180, interval=0.2)
        yield s
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def model_copy(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("served") / "model.gguf"
    shutil.copyfile(default_model_path, dst)
    return dst


@pytest.fixture(scope="module")
def server(model_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(model_copy, tmp_path_factory.mktemp("log"), "--max-body", str(1 << 20)) as s:
        yield s


def chat_body(**kw: object) -> dict:
    return {"messages": Q, "max_tokens": 4, "temperature": 0, **kw}


def comp_body(**kw: object) -> dict:
    return {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, **kw}


def _conn(url: str, timeout: float = 120, rcvbuf: int | None = None) -> http.client.HTTPConnection:
    """A connection over a socket the test keeps (``c.raw``), with a receive buffer of ``rcvbuf`` bytes."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    c = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((u.hostname, u.port))
    c.sock = c.raw = sock  # type: ignore[attr-defined]
    return c


def call(url: str, path: str, body: dict, timeout: float = 120) -> tuple[int, dict, str | dict]:
    """(status, headers, content): a stream's text joined, or the JSON body."""
    c = _conn(url, timeout)
    try:
        c.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        r = c.getresponse()
        headers = {k.lower(): v for k, v in r.getheaders()}
        if r.status == 200 and body.get("stream"):
            lines = r.read().decode().splitlines()
            data = [ln[6:] for ln in lines if ln.startswith("data: ")]
            assert data and data[-1] == "[DONE]", lines[-3:]
            chunks = [json.loads(d) for d in data[:-1]]
            text = "".join(ch["choices"][0].get("text") or ch["choices"][0].get("delta", {}).get("content") or ""
                           for ch in chunks if ch.get("choices"))
            return r.status, headers, text
        return r.status, headers, json.loads(r.read())
    finally:
        c.close()


def answer(r: dict) -> str:
    ch = r["choices"][0]
    return ch["message"]["content"] if "message" in ch else ch["text"]


def reference(s: Server) -> dict[str, str]:
    st, _, c = call(s.url, "/v1/chat/completions", chat_body())
    assert st == 200, c
    st2, _, c2 = call(s.url, "/v1/completions", comp_body())
    assert st2 == 200, c2
    return {"chat": answer(c), "comp": answer(c2)}


# ---------------------------------------------------------------------------------------- load

def _round(s: Server, ref: dict[str, str], clients: int = 32, each: int = 2) -> Counter:
    outcomes: Counter = Counter()
    bad: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(i: int) -> None:
        start.wait(timeout=60)
        for k in range(each):
            chat = (i + k) % 2 == 0
            try:
                if chat:
                    st, h, c = call(s.url, "/v1/chat/completions", chat_body())
                else:
                    st, h, c = call(s.url, "/v1/completions", comp_body(stream=True))
            except Exception as e:  # a reset, a timeout: never acceptable
                with lock:
                    bad.append(f"client {i}: {type(e).__name__}: {e}")
                continue
            with lock:
                if st == 200:
                    got = c if isinstance(c, str) else answer(c)
                    want = ref["chat" if chat else "comp"]
                    outcomes["ok" if got == want else "wrong"] += 1
                    if got != want:
                        bad.append(f"client {i}: {got!r} != {want!r}")
                elif st == 503 and isinstance(c, dict) and c["error"]["code"] == "server_busy" and \
                        h.get("retry-after") == "1":
                    outcomes["busy"] += 1
                else:
                    outcomes[f"status {st}"] += 1
                    bad.append(f"client {i}: {st} {str(c)[:200]}")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not bad, CASES.what("load-32") + "\n" + "\n".join(bad[:10])
    assert sum(outcomes.values()) == clients * each
    return outcomes


@covers("load-32", "load-rss")
def test_load_32_clients(server: Server) -> None:
    ref = reference(server)
    rss = []
    for _ in range(3):
        out = _round(server, ref, each=1)
        server.alive()
        assert out["ok"] >= 2, out  # the server did serve, not only refuse
        assert wait_for(lambda: get(server.url + "/health").json()["slots_processing"] == 0, timeout=60)
        rss.append(server.rss)
    assert rss[2] <= rss[1] * 1.05 + (24 << 20), (CASES.what("load-rss"), [r >> 20 for r in rss])


# ---------------------------------------------------------------------------------------- faults

def _event(r: http.client.HTTPResponse) -> bytes:
    """The next non-empty line of a (chunked) event stream."""
    while True:
        line = r.readline()
        if line.strip() or not line:
            return line


def _reset(c: http.client.HTTPConnection, r: http.client.HTTPResponse) -> None:
    """Close with an RST (SO_LINGER 0), as a client that dies does (the socket closes with its last user)."""
    c.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # type: ignore[attr-defined]
    r.close()
    c.raw.close()  # type: ignore[attr-defined]


def _busy(s: Server) -> int:
    return get(s.url + "/health").json()["slots_processing"]


@covers("disconnect")
def test_clients_that_vanish_mid_stream_free_their_slots(server: Server) -> None:
    ref = reference(server)
    generated = metric(server.url, "localllm_generated_tokens_total")
    conns = []
    for _ in range(2):
        c = _conn(server.url)
        c.request("POST", "/v1/completions", body=json.dumps(comp_body(max_tokens=CTX, ignore_eos=True, stream=True)),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        for _ in range(3):
            assert _event(r).startswith(b"data: ")
        conns.append((c, r))
    assert _busy(server) == 2
    for c, r in conns:
        _reset(c, r)
    assert wait_for(lambda: _busy(server) == 0, timeout=30), CASES.what("disconnect")
    assert metric(server.url, "localllm_generated_tokens_total") - generated < 120, CASES.what("disconnect")
    server.alive()
    st, _, c = call(server.url, "/v1/chat/completions", chat_body())
    assert st == 200 and answer(c) == ref["chat"]


@covers("slow-reader")
def test_a_slow_reader_blocks_nobody(server: Server) -> None:
    ref = reference(server)
    body = comp_body(max_tokens=48, ignore_eos=True)
    st, _, whole = call(server.url, "/v1/completions", body)
    assert st == 200 and whole["usage"]["completion_tokens"] == 48
    c = _conn(server.url, rcvbuf=4096)
    try:
        c.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                  headers={"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200
        for _ in range(3):  # others are answered while this client reads nothing
            st, _, other = call(server.url, "/v1/chat/completions", chat_body(), timeout=60)
            assert st == 200 and answer(other) == ref["chat"], CASES.what("slow-reader")
        lines = r.read().decode().splitlines()
    finally:
        c.close()
    data = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert data[-1] == "[DONE]", CASES.what("slow-reader")
    text = "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1])
    assert text == whole["choices"][0]["text"], CASES.what("slow-reader")


@covers("file-deleted", "file-replaced")
def test_model_file_deleted_then_replaced_while_serving(server: Server, tiny_gguf: Path) -> None:
    ref = reference(server)
    model_id = get(server.api + "/models").json()["data"][0]["id"]
    os.remove(server.model_path)
    assert reference(server) == ref, CASES.what("file-deleted")
    other = server.model_path.with_name("other.tmp")
    shutil.copyfile(tiny_gguf, other)
    os.replace(other, server.model_path)
    assert reference(server) == ref, CASES.what("file-replaced")
    assert get(server.api + "/models").json()["data"][0]["id"] == model_id
    server.alive()


# ---------------------------------------------------------------------------------------- abuse

def _raw(s: Server, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", int(s.url.rsplit(":", 1)[1])), timeout=60) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                out += chunk
        return out


def _status(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1]) if raw.startswith(b"HTTP/") else 0


@covers("body-413", "chunked-413", "nested-json", "huge-max-tokens", "huge-n", "huge-logit-bias", "header-flood",
        "abuse-rss")
def test_abuse_is_refused_without_growing(server: Server) -> None:
    before = server.rss
    r = post(server.api + "/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}',
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413, CASES.what("body-413")

    # chunked: the server cannot know the size before reading; it must stop reading early
    port = int(server.url.rsplit(":", 1)[1])
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        piece = b"%x\r\n" % (1 << 20) + b"a" * (1 << 20) + b"\r\n"
        try:
            while sent < 64 << 20:
                sock.sendall(piece)
                sent += 1 << 20
        except (BrokenPipeError, ConnectionResetError):
            pass
        with contextlib.suppress(OSError):
            reply = sock.recv(4096)
    assert sent <= 16 << 20, (CASES.what("chunked-413"), sent >> 20)
    assert _status(reply) in (0, 413), reply[:200]

    for raw in ("[" * 100000 + "]" * 100000, '{"a":' * 50000 + "1" + "}" * 50000):
        r = post(server.api + "/completions", content=raw.encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_argument", CASES.what("nested-json")

    st, _, c = call(server.url, "/v1/completions", comp_body(prompt="a " * 200, max_tokens=10 ** 12, ignore_eos=True))
    assert st == 200 and c["usage"]["prompt_tokens"] >= 150, c
    assert 1 <= c["usage"]["completion_tokens"] <= CTX - c["usage"]["prompt_tokens"], CASES.what("huge-max-tokens")

    for field, value in (("n", 10 ** 9), ("best_of", 10 ** 5), ("num_beams", 10 ** 4),
                         ("logit_bias", {str(i): 1 for i in range(20000)})):
        r = post(server.api + "/completions", json=comp_body(**{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text[:300])

    many = b"".join(b"X-H%d: vvvvvvvvvv\r\n" % i for i in range(10000))
    out = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"Connection: close\r\n\r\n")
    assert _status(out) in (200, 431), (CASES.what("header-flood"), out[:200])
    out = _raw(server, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (2 << 20) +
               b"\r\nConnection: close\r\n\r\n")
    assert _status(out) in (0, 431), (CASES.what("header-flood"), out[:200])
    server.alive()
    assert get(server.url + "/health").status_code == 200
    assert server.rss - before < 64 << 20, (CASES.what("abuse-rss"), before >> 20, server.rss >> 20)


# ---------------------------------------------------------------------------------------- SIGTERM

def _stream_open(url: str, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    c = _conn(url)
    c.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 200
    assert _event(r).startswith(b"data: ")
    return c, r


@covers("sigterm")
def test_sigterm_lets_requests_in_flight_finish(default_model_path: Path, tmp_path: Path) -> None:
    with serve(default_model_path, tmp_path, "--drain-timeout", "120") as s:
        c, r = _stream_open(s.url, comp_body(max_tokens=80, ignore_eos=True, stream=True,
                                            stream_options={"include_usage": True}))
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(r=call(s.url, "/v1/completions",
                                                                comp_body(max_tokens=40, ignore_eos=True))))
        t.start()
        assert wait_for(lambda: _busy(s) == 2, timeout=60)
        s.proc.send_signal(signal.SIGTERM)
        try:
            h = get(s.url + "/health", timeout=10)
            assert h.status_code == 503 and h.json()["status"] == "shutting_down", CASES.what("sigterm")
            late = post(s.api + "/completions", json=comp_body(), timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable", CASES.what("sigterm")
        except ConnectionError:  # already closed: refused is fine too
            pass
        lines = r.read().decode().splitlines()
        c.close()
        t.join(timeout=120)
        data = [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert data and data[-1] == "[DONE]", (CASES.what("sigterm"), lines[-3:])
        assert json.loads(data[-2])["usage"]["completion_tokens"] == 80
        st, _, body = done["r"]
        assert st == 200 and body["usage"]["completion_tokens"] == 40, CASES.what("sigterm")
        assert s.proc.wait(timeout=60) == 0, s.log.read_text()[-2000:]
        assert "SIGTERM" in s.log.read_text()


@covers("sigterm-timeout")
def test_sigterm_cuts_what_outlasts_the_drain_timeout(default_model_path: Path, tmp_path: Path) -> None:
    with serve(default_model_path, tmp_path, "--drain-timeout", "1", "--ctx", "2048") as s:
        c, r = _stream_open(s.url, comp_body(max_tokens=2000, ignore_eos=True, stream=True))
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=60) == 0, (CASES.what("sigterm-timeout"), s.log.read_text()[-2000:])
        with contextlib.suppress(OSError, http.client.HTTPException):
            r.read()
        c.close()
        assert "still running" in s.log.read_text()


# ---------------------------------------------------------------------------------------- soak (-m soak)

@pytest.mark.soak
def test_soak(default_model_path: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Mixed load with faults for LOCALLLM_SOAK_SECONDS (600): rounds of 16 clients, a client that
    vanishes mid-stream and a hostile body each round; prints the figures for docs/RELIABILITY.md."""
    if "soak" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a long soak: run with -m soak (LOCALLLM_SOAK_SECONDS, default 600)")
    seconds = float(os.environ.get("LOCALLLM_SOAK_SECONDS", "600"))
    with serve(default_model_path, tmp_path) as s:
        ref = reference(s)
        rss_start, total, rounds = s.rss, Counter(), 0
        rss_first = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            c = _conn(s.url)
            c.request("POST", "/v1/completions", body=json.dumps(comp_body(max_tokens=CTX, ignore_eos=True,
                                                                           stream=True)),
                      headers={"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status == 200:
                _event(r)
            total[f"vanished ({r.status})"] += 1
            _reset(c, r)
            bad = post(s.api + "/completions", content=b"[" * 100000, headers={"Content-Type": "application/json"})
            total[f"hostile ({bad.status_code})"] += 1
            total.update(_round(s, ref, clients=16, each=2))
            s.alive()
            rounds += 1
            if rounds == 1:
                rss_first = s.rss
        assert wait_for(lambda: _busy(s) == 0, timeout=60)
        rss_end = s.rss
        print(f"\nSOAK {seconds:g} s, {rounds} rounds: {dict(total)}; RSS start {rss_start >> 20} MiB, "
              f"after round 1 {rss_first >> 20} MiB, end {rss_end >> 20} MiB")
        assert rss_end <= rss_first * 1.10 + (32 << 20)


# ---------------------------------------------------------------------------------------- the document

def test_reliability_doc_lists_the_server_cases() -> None:
    CASES.check_doc()
