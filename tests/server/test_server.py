"""``localllm serve`` against the official ``openai`` client on loopback."""

from __future__ import annotations

import json
import threading
import time

import pytest

from localllm import Model
from tests.helpers import default_quant, free_port, metric, turn_end_cut
from tests.serverutil import get, live_server, post, request, stream_lines, wait_for

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
Q = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    with live_server(model=MODEL, parallel=4, ctx=512, max_queue=8) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(server, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [f"smollm2-135m:{default_quant().lower()}"]
    r = get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 5


def test_chat_stream_matches_non_stream(client):
    whole = client.chat.completions.create(model=MODEL, messages=Q, max_tokens=12, temperature=0)
    pieces, finish, usage = [], None, None
    for ch in client.chat.completions.create(model=MODEL, messages=Q, max_tokens=12, temperature=0, stream=True,
                                              stream_options={"include_usage": True}):
        if ch.usage:
            usage = ch.usage
        for c in ch.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_raw_sse_ends_with_done(server):
    with stream_lines(server.api + "/chat/completions", {"messages": Q, "max_tokens": 3, "stream": True}) as it:
        lines = [ln for ln in it if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    body = {"messages": Q, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with stream_lines(server.api + "/chat/completions", body) as it:
        chunks = [json.loads(ln[6:]) for ln in it if ln.startswith("data: {")]
    # as OpenAI's: "usage": null on every chunk but the last, which has no choices and the counts
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] <= 3


def test_second_turn_reuses_kv(client, default_model_path):
    msgs = [{"role": "user", "content": "Name a colour."}]
    a = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    msgs += [{"role": "assistant", "content": a.choices[0].message.content},
             {"role": "user", "content": "And another one?"}]
    b = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    # up to the last finished turn of 16+ tokens (the default system prompt); the short question
    # and the answer (decoded one token at a time) are read again, so the numbers equal a fresh run's
    with Model(default_model_path, n_ctx=256, prompt_cache=False) as m:
        (im_end,) = m.engine.llama.tokenize("<|im_end|>", add_special=False, parse_special=True)
        want = turn_end_cut(m.chat_tokens(msgs[:1]), im_end)
        fresh = m.chat_complete(msgs, max_tokens=6, temperature=0).text
    assert b.usage.prompt_tokens_details.cached_tokens == want > 0
    assert b.choices[0].message.content == fresh


def test_completions_n_and_best_of(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert r.choices[0].text.startswith(" 4, 5")
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                  n=3, seed=7)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # different seeds per choice
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6, temperature=1.0,
                                  n=2, best_of=4, seed=7)
    assert len(r.choices) == 2 and r.usage.completion_tokens <= 24


def test_beam_search_field(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                  temperature=0, extra_body={"num_beams": 1})
    b = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6,
                                  extra_body={"num_beams": 3})
    assert b.choices[0].text and b.choices[0].finish_reason in ("stop", "length")
    g = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert r.choices[0].text == g.choices[0].text


def test_extension_fields_and_json(client):
    r = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, temperature=0,
                                  extra_body={"top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1,
                                              "ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "A person as JSON"}], max_tokens=48, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": schema}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["age"], int)
    r = client.completions.create(model=MODEL, prompt="Answer:", max_tokens=8, temperature=0,
                                  extra_body={"grammar": 'root ::= "yes" | "no"'})
    assert r.choices[0].text in ("yes", "no")


def test_embeddings(client):
    r = client.embeddings.create(model=MODEL, input=["hello", "world"])
    assert len(r.data) == 2 and len(r.data[0].embedding) == 576
    assert abs(sum(x * x for x in r.data[0].embedding) - 1) < 1e-3


@pytest.mark.parametrize("body,status,param", [
    ({"messages": Q, "max_tokens": -1}, 400, "max_tokens"),
    ({"messages": Q, "temperature": "hot"}, 400, "temperature"),
    ({"messages": "hi"}, 400, "messages"),
    ({}, 400, "messages"),
    ({"messages": Q, "model": "gpt-4"}, 404, "model"),
    ({"messages": Q, "n": 99}, 400, "n"),
    ({"messages": Q, "response_format": {"type": "xml"}}, 400, "response_format"),
    ({"messages": Q, "grammar": "root ::= ("}, 400, "grammar"),
    ({"messages": Q, "grammar": "root ::= (", "stream": True}, 400, "grammar"),
    ({"messages": Q, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"messages": Q, "num_beams": 2, "n": 2}, 400, "num_beams"),
    ({"messages": Q, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"messages": Q, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"messages": Q, "grammar": 'root ::= "a"', "ignore_eos": True, "stream": True}, 400, "ignore_eos"),
    ({"messages": Q, "stop": ["x" * 5000]}, 400, "stop"),
    ({"messages": Q, "top_k": 2 ** 32 + 5}, 400, "top_k"),
])
def test_bad_input_is_4xx_json(server, body, status, param):
    r = post(server.api + "/chat/completions", json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert param in (err["param"] or "")


def test_invalid_json_and_unknown_route(server):
    r = post(server.api + "/chat/completions", content=b"{not json", timeout=10,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert get(server.api + "/nope").status_code == 404
    assert get(server.api + "/chat/completions").status_code == 405


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="word " * 600, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_metrics_count_what_happened(server, client):
    """After requests with known token counts, the counters moved by exactly those counts."""
    names = ("localllm_generated_tokens_total", "localllm_prompt_tokens_total",
             'localllm_requests_total{endpoint="api.completions",status="200"}',
             'localllm_requests_total{endpoint="api.completions",status="400"}',
             "localllm_time_to_first_token_seconds_count")
    before = {n: metric(server.url, n, default=0.0) for n in names}  # a labelled counter is absent until counted
    usage = []
    for prompt, n in (("Hi", 3), ("Count: 1, 2,", 5), ("The sea", 7)):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == n
        usage.append(r.usage)
    post(server.api + "/completions", json={"prompt": "x", "max_tokens": 0})  # one 400
    after = {n: metric(server.url, n) for n in names}
    assert after[names[0]] - before[names[0]] == 3 + 5 + 7
    assert after[names[1]] - before[names[1]] == sum(u.prompt_tokens for u in usage)
    assert after[names[2]] - before[names[2]] == 3
    assert after[names[3]] - before[names[3]] == 1
    assert after[names[4]] - before[names[4]] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_over_http(client, stream):
    """A stop string that spans two tokens (", 5" is "," + " " + "5") ends the text before it."""
    kw = dict(model=MODEL, prompt="1, 2, 3,", max_tokens=20, temperature=0, stop=[", 5"])
    if stream:
        pieces, finish = [], None
        for ch in client.completions.create(stream=True, **kw):
            for c in ch.choices:
                pieces.append(c.text)
                finish = c.finish_reason or finish
        text = "".join(pieces)
    else:
        r = client.completions.create(**kw)
        text, finish = r.choices[0].text, r.choices[0].finish_reason
    assert text == " 4" and finish == "stop"


def test_model_by_id_cors_and_x_api_key():
    with live_server(model=MODEL, parallel=1, ctx=256, api_key="k", cors_origins=["http://ok.example"],
                     model_alias="mine") as live:
        h = {"X-Api-Key": "k"}
        assert get(live.api + "/models/mine", headers=h).json()["id"] == "mine"
        assert get(live.api + "/models/smollm2-135m", headers=h).status_code == 200  # the store name too
        r = get(live.api + "/models/gpt-4", headers=h)
        assert r.status_code == 404 and r.json()["error"]["param"] == "model"
        assert get(live.api + "/models", headers={"X-Api-Key": "wrong"}).status_code == 401
        ok = get(live.url + "/health", headers={"Origin": "http://ok.example"})
        assert ok.headers.get("access-control-allow-origin") == "http://ok.example"
        bad = get(live.url + "/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in bad.headers
        pre = request("OPTIONS", live.api + "/chat/completions", headers={"Origin": "http://ok.example"})
        assert pre.status_code == 204 and "Authorization" in pre.headers["access-control-allow-headers"]


PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "My favourite colour is", "Python is a",
           "Once upon a time", "The best way to learn", "Water boils at", "In 1969, the first"]


def _multi_sequence_steps(server) -> float:
    """Decode steps so far that held two or more sequences (from the per-step histogram)."""
    return (metric(server.url, "localllm_batch_sequences_count")
            - metric(server.url, 'localllm_batch_sequences_bucket{le="1.0"}'))


def test_eight_concurrent_clients_match_alone(client, server):
    """Greedy output is the same alone and in a batch (one KV stream per slot, see docs/serve.md),
    and the batch is real: decode steps held several sequences at once."""
    def ask(p: str) -> str:
        return client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].text

    alone = [ask(p) for p in PROMPTS]
    before = _multi_sequence_steps(server)
    together: list[str | None] = [None] * len(PROMPTS)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(PROMPTS[i])))
               for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert len(set(alone)) == len(alone)  # independent answers, not one request's text repeated
    # a serial scheduler would decode one sequence per step: 8 requests x 16 tokens, never batched
    assert _multi_sequence_steps(server) - before >= 8


def test_beam_search_does_not_stop_other_clients(server, client):
    """A beam request's beams are sequences of the shared batch: a short request sent
    while it runs finishes first."""
    beam: dict = {}

    def run_beam() -> None:
        beam["r"] = client.completions.create(model=MODEL, prompt="Write a long story:", max_tokens=60,
                                              extra_body={"num_beams": 3, "ignore_eos": True})
        beam["t"] = time.monotonic()

    def busy() -> int:
        return get(server.url + "/health").json()["slots_processing"]

    assert wait_for(lambda: busy() == 0)
    t = threading.Thread(target=run_beam)
    t.start()
    assert wait_for(lambda: busy() >= 3, timeout=30)
    before = _multi_sequence_steps(server)
    r = client.completions.create(model=MODEL, prompt="1, 2, 3,", max_tokens=4, temperature=0)
    done = time.monotonic()
    t.join(timeout=120)
    assert r.choices[0].text.startswith(" 4")
    assert "t" in beam and beam["t"] > done, "the short request waited for the beam search"
    assert len(beam["r"].choices) == 1 and beam["r"].usage.completion_tokens == 60
    assert _multi_sequence_steps(server) > before


def test_more_beams_than_slots_is_a_400_that_says_why(server):
    r = post(server.api + "/completions", json={"prompt": "Hi", "num_beams": 5, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_beams"
    assert "4 sequences at once" in r.json()["error"]["message"]
    r = post(server.api + "/completions", json={"prompt": "Hi", "num_beams": 2, "presence_penalty": 1.0})
    assert r.status_code == 400 and "presence_penalty" in r.json()["error"]["message"]


def test_disconnect_frees_slot(server):
    def busy() -> int:
        return get(server.url + "/health").json()["slots_processing"]

    assert wait_for(lambda: busy() == 0)
    with stream_lines(server.api + "/completions",
                      {"prompt": "Count: 1, 2,", "max_tokens": 400, "stream": True, "ignore_eos": True}) as it:
        for _ in range(12):
            next(it)
        assert busy() == 1
    t0 = time.monotonic()
    assert wait_for(lambda: busy() == 0, timeout=1.0)
    assert time.monotonic() - t0 < 1.0


def test_queue_overflow_is_503_with_retry_after():
    with live_server(model=MODEL, parallel=1, ctx=1024, max_queue=1) as live:
        # two streaming requests that would run for seconds: one holds the slot, one waits;
        # they stay until the test lets go (a fixed-length request could finish mid-check)
        body = {"prompt": "Count: 1, 2,", "max_tokens": 900, "ignore_eos": True, "stream": True}
        release = threading.Event()
        first_lines: list[str] = []

        def hold() -> None:
            with stream_lines(live.api + "/completions", body) as it:
                first_lines.append(next(it))
                release.wait(60)

        threads = [threading.Thread(target=hold) for _ in range(2)]
        for t in threads:
            t.start()
        assert wait_for(lambda: get(live.url + "/health").json()["queue"] == 1, timeout=10)
        r = post(live.api + "/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "server_busy"
        release.set()  # the holders disconnect; the waiting one gets the slot, then leaves too
        for t in threads:
            t.join(timeout=60)
        assert len(first_lines) == 2 and all(line.startswith("data: ") for line in first_lines)


def test_api_key_413_and_public_health():
    with live_server(model=MODEL, parallel=1, ctx=256, api_key="s3cret", max_body_bytes=4096) as live:
        assert get(live.url + "/health").status_code == 200
        assert get(live.url + "/").status_code == 200
        r = get(live.api + "/models")
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert get(live.api + "/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        good = openai.OpenAI(base_url=live.api, api_key="s3cret", max_retries=0)
        assert good.models.list().data
        bad = openai.OpenAI(base_url=live.api, api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        r = post(live.api + "/completions", headers={"Authorization": "Bearer s3cret"},
                       json={"prompt": "x" * 10000, "max_tokens": 1})
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_health_is_503_while_loading(monkeypatch):
    """The load is held by the test, so /health is certainly seen loading, then ready."""
    from localllm.core import engine
    from localllm.server import ServerSettings, create_app, shutdown

    release = threading.Event()
    real_init = engine.Engine.__init__

    def held(self, *a, **kw):
        assert release.wait(60)
        real_init(self, *a, **kw)

    monkeypatch.setattr(engine.Engine, "__init__", held)
    app = create_app(ServerSettings.create(model=MODEL, parallel=1, ctx=128, load_async=True))
    try:
        c = app.test_client()
        first = c.get("/health")
        assert first.status_code == 503 and first.json["status"] == "loading"
        assert first.headers["Retry-After"] == "1"
        r = c.get("/v1/models")
        assert r.status_code == 503 and r.json["error"]["code"] == "unavailable"
        release.set()
        assert wait_for(lambda: c.get("/health").status_code == 200, timeout=60)
        assert c.get("/v1/models").status_code == 200
    finally:
        release.set()
        shutdown(app)


def test_cli_refuses_public_bind_without_key():
    from click.testing import CliRunner

    from localllm.cli.serve import command

    r = CliRunner().invoke(command, ["--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--api-key" in r.output


def test_the_real_server_process(default_model_path, tmp_path):
    """`localllm serve` as users start it (waitress, its own process), end to end, then Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "localllm", "serve", "--model-path", str(default_model_path),
                             "--port", str(port), "--parallel", "2", "--ctx", "512"], stdout=log, stderr=log,
                            env={k: v for k, v in os.environ.items() if k != "LOCALLLM_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(open(tmp_path / "serve.log").read())
            try:
                return get(url + "/health", timeout=2).status_code == 200
            except OSError:
                return False
        assert wait_for(up, timeout=120, interval=0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=MODEL, messages=Q, max_tokens=8, temperature=0)
        assert r.choices[0].message.content and 1 <= r.usage.completion_tokens <= 8
        streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model=MODEL, messages=Q, max_tokens=8, temperature=0, stream=True) if ch.choices)
        assert streamed == r.choices[0].message.content
        assert get(url + "/").status_code == 200 and b"<html" in get(url + "/").content.lower()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_tokenize_and_detokenize(server, client, model):
    """llama-server's /tokenize and /detokenize, through the tokenizer the model uses: the same ids as
    Model.tokenize, and a chat counts exactly as a chat completion reads it."""
    text = "Hello <|im_end|> wörld 123"
    r = post(server.url + "/tokenize", json={"content": text}).json()
    assert r["tokens"] == model.tokenize(text, add_bos=False, special=True)
    assert post(server.url + "/tokenize", json={"content": text, "parse_special": False}).json()["tokens"] == \
        model.tokenize(text, add_bos=False, special=False)
    pieces = post(server.url + "/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in pieces) == text and [p["id"] for p in pieces] == r["tokens"]
    assert post(server.url + "/detokenize", json={"tokens": r["tokens"]}).json() == {"content": text}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    n = len(post(server.url + "/tokenize", json={"messages": msgs}).json()["tokens"])
    done = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1)
    assert n == done.usage.prompt_tokens == model.count_tokens(msgs[1:], system="Be brief.")
    for bad, param in (({"content": 3}, "content"), ({"tokens": [10 ** 9]}, "tokens"), ({"tokens": "x"}, "tokens"),
                       ({"messages": "hi"}, "messages")):
        url = server.url + ("/detokenize" if "tokens" in bad else "/tokenize")
        res = post(url, json=bad)
        assert res.status_code == 400 and res.json()["error"]["param"] == param, (bad, res.text)
