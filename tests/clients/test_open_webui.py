"""Open WebUI, replayed: it does not install beside us (a whole web app), so these are the exact
requests its OpenAI connection sends, taken from its source (backend/open_webui/routers/openai.py
and utils/payload.py, 2026): the model list at ``{url}/models`` (``url`` as the user typed it, a
trailing slash giving ``/v1//models``), then chats with its own headers, ``stream_options`` forced
on, an ephemeral ``cache_control`` on the last message's last text part, and ``reasoning_effort``
sent as ``reasoning: {"effort": ...}``. Each answer must equal the plain request's."""

from __future__ import annotations

import json

import pytest

from tests.clients.conftest import CTX, KEY
from tests.serverutil import get, post, stream_lines

HEADERS = {"Authorization": f"Bearer {KEY}", "X-OpenWebUI-User-Name": "Ada Lovelace",
           "X-OpenWebUI-User-Id": "2f1c", "X-OpenWebUI-User-Email": "ada@example.org",
           "X-OpenWebUI-User-Role": "admin", "X-OpenWebUI-Chat-Id": "c-81"}
CHAT = [{"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."}]


def _open_webui(messages: list[dict]) -> list[dict]:
    """utils/payload.py: the last message's content becomes text parts, the last one marked."""
    last = dict(messages[-1])
    last["content"] = [{"type": "text", "text": last["content"], "cache_control": {"type": "ephemeral"}}]
    return [*messages[:-1], last]


@pytest.fixture(scope="module")
def model_id(served) -> str:
    r = get(served.url + "/v1//models", headers=HEADERS)  # OPENAI_API_BASE_URL "http://host:7860/v1/"
    assert r.status_code == 200
    models = r.json()["data"]
    assert [m["owned_by"] for m in models] == ["localllm"] and models[0]["context_length"] == CTX
    return models[0]["id"]


def test_streamed_chat_as_open_webui_sends_it(served, model_id):
    body = {"model": model_id, "messages": _open_webui(CHAT), "stream": True, "temperature": 0, "max_tokens": 12,
            "stream_options": {"include_usage": True}}
    deltas, usage = [], None
    with stream_lines(served.url + "/v1//chat/completions", body, headers=HEADERS) as lines:
        for line in lines:
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                deltas += [c["delta"].get("content") or "" for c in chunk["choices"]]
    plain = post(served.api + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                 json={"model": model_id, "messages": CHAT, "temperature": 0, "max_tokens": 12}).json()
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert usage["prompt_tokens"] == plain["usage"]["prompt_tokens"] and usage["completion_tokens"] == 12


def test_title_task_and_reasoning_object(served, model_id):
    """Background tasks (title, tags) are plain non-streamed chats; ``reasoning`` is an object."""
    body = {"model": model_id, "messages": _open_webui(CHAT), "stream": False, "temperature": 0,
            "max_tokens": 8, "reasoning": {"effort": "low"}}
    r = post(served.api + "/chat/completions", headers=HEADERS, json=body)
    assert r.status_code == 200, r.text
    plain = post(served.api + "/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                 json={"model": model_id, "messages": CHAT, "temperature": 0, "max_tokens": 8}).json()
    assert r.json()["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    bad = post(served.api + "/chat/completions", headers=HEADERS, json={**body, "reasoning": "low"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning"
