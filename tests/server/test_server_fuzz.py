"""Bad input never gives a 5xx: hypothesis-generated request bodies against the app.

Generation is kept tiny (max_tokens is forced small when it is a sane number)
so the fuzzing tests validation, not the model.
"""

from __future__ import annotations

import json

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                        st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_value = st.recursive(json_scalar, lambda c: st.one_of(st.lists(c, max_size=4),
                                                           st.dictionaries(st.text(max_size=8), c, max_size=4)),
                          max_leaves=12)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "min_p", "repeat_penalty",
          "seed", "stop", "stream", "n", "best_of", "num_beams", "ignore_eos", "grammar", "response_format",
          "stream_options", "input", "presence_penalty", "max_completion_tokens", "echo"]
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "robot", 3]),
                                 "content": st.one_of(st.text(max_size=30), json_value)})
body = st.dictionaries(st.sampled_from(FIELDS), st.one_of(json_value, st.lists(message, max_size=3)), max_size=8)


@pytest.fixture(scope="module")
def client():
    from localllm.server import ServerSettings, create_app, shutdown

    app = create_app(ServerSettings.create(model="smollm2-135m", parallel=2, ctx=256, max_queue=64, load_async=False,
                                    max_body_bytes=64 << 10))
    yield app.test_client()
    shutdown(app)


def _tame(b: dict) -> dict:
    b = dict(b)
    for k in ("max_tokens", "max_completion_tokens"):
        if isinstance(b.get(k), int) and not isinstance(b.get(k), bool) and b[k] > 2:
            b[k] = 2
    if "max_tokens" not in b:
        b["max_tokens"] = 2
    if isinstance(b.get("num_beams"), int) and not isinstance(b["num_beams"], bool) and b["num_beams"] > 2:
        b["num_beams"] = 2
    return b


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]), b=body)
def test_fuzzed_bodies_never_5xx(client, path, b):
    r = client.post(path, data=json.dumps(_tame(b), allow_nan=True), content_type="application/json")
    data = r.get_data()  # drains a stream, if any
    assert r.status_code < 500, data[:500]
    if r.status_code >= 400:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "param", "code"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200))
def test_garbage_bytes_are_400(client, raw):
    r = client.post("/v1/chat/completions", data=raw, content_type="application/json")
    assert 400 <= r.status_code < 500


def test_deeply_nested_json_is_400(client):
    raw = "[" * 100000 + "]" * 100000
    r = client.post("/v1/completions", data=raw, content_type="application/json")
    assert r.status_code in (400, 413)
