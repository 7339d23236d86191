"""One server, every model in the store (--all-models): the official openai client
names SmolLM2 and Gemma-3 in turn; idle models unload; budgets are enforced."""

from __future__ import annotations

import threading

import pytest

from tests.serverutil import get, live_server, post, wait_for

openai = pytest.importorskip("openai")
Q = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def server(default_model_path, gemma_path):
    with live_server(model="smollm2-135m", all_models=True, keep_alive=3.0, ctx=512, parallel=2) as live:
        yield live


def _loaded(server) -> dict[str, bool]:
    return {m["id"]: m["loaded"] for m in get(server.api + "/models").json()["data"]}


def test_requests_name_models_and_each_answers_as_itself(server, default_model_path, gemma_path):
    from localllm import loader

    smol, gemma = loader.model_id(default_model_path), loader.model_id(gemma_path)
    c = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
    listed = _loaded(server)
    assert listed[smol] is True and listed[gemma] is False   # the default loads at start, Gemma on first use
    answers = {}
    for name in ("gemma3-270m", "smollm2-135m", "gemma3-270m", smol):
        r = c.chat.completions.create(model=name, messages=Q, max_tokens=6, temperature=0)
        answers.setdefault(r.model, set()).add(r.choices[0].message.content)
    assert set(answers) == {smol, gemma} and all(len(v) == 1 for v in answers.values())
    assert answers[smol] != answers[gemma]
    assert _loaded(server)[gemma] is True
    assert set(get(server.url + "/health").json()["models_loaded"]) == {smol, gemma}


def test_an_embedding_and_a_chat_for_different_models_run_together(server):
    out: dict[str, object] = {}

    def embed() -> None:
        out["e"] = post(server.api + "/embeddings", json={"model": "gemma3-270m", "input": ["a", "b"]}).json()

    t = threading.Thread(target=embed)
    t.start()
    chat = post(server.api + "/chat/completions", json={"model": "smollm2-135m", "messages": Q, "max_tokens": 4})
    t.join(timeout=120)
    assert chat.status_code == 200 and chat.json()["model"].startswith("smollm2-135m:")
    assert out["e"]["model"].startswith("gemma3-270m:") and len(out["e"]["data"]) == 2


def test_an_idle_model_is_unloaded_after_keep_alive(server, gemma_path):
    from localllm import loader

    gemma = loader.model_id(gemma_path)
    post(server.api + "/chat/completions", json={"model": "gemma3-270m", "messages": Q, "max_tokens": 2})
    assert _loaded(server)[gemma] is True
    assert wait_for(lambda: _loaded(server)[gemma] is False, timeout=20, interval=0.5)
    r = post(server.api + "/chat/completions", json={"model": "gemma3-270m", "messages": Q, "max_tokens": 2})
    assert r.status_code == 200   # and it comes back on the next request


def test_unknown_and_too_large_models_are_4xx(server, gemma_path):
    r = post(server.api + "/chat/completions", json={"model": "no-such-model", "messages": Q, "max_tokens": 2})
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    with live_server(model="smollm2-135m", all_models=True, max_memory=250 << 20, ctx=512) as small:
        r = post(small.api + "/chat/completions", json={"model": "gemma3-270m", "messages": Q, "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_too_large"
        assert "needs about" in r.json()["error"]["message"] and "250 MiB" in r.json()["error"]["message"]
