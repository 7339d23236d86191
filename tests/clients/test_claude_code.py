"""Claude Code and the ``anthropic`` SDK against a real ``localllm serve``: the beta endpoint,
both ways of sending the key, its background model names mapped by ``--alias``, usage in
``message_start``, and prefix reuse across a recorded multi-turn session whose billing header
changes on every request."""

from __future__ import annotations

import copy
import json
import secrets

import pytest

from tests.clients.conftest import KEY
from tests.helpers import FIXTURES, cli
from tests.serverutil import post, stream_lines

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
MSGS = [{"role": "user", "content": "Name three colours."}]
SESSION = json.loads((FIXTURES / "claude_code_session.json").read_text())


@pytest.fixture(scope="module")
def client(served):
    return anthropic.Anthropic(base_url=served.url, api_key=KEY, max_retries=0, timeout=180)


def test_beta_endpoint_bearer_key_and_mapped_names_answer_as_the_served_model(served, client):
    ref = client.messages.create(model="smollm2-135m", max_tokens=10, messages=MSGS, extra_body={"temperature": 0})
    # Claude Code: ANTHROPIC_AUTH_TOKEN (Authorization: Bearer), the beta endpoint (?beta=true), its own names
    bearer = anthropic.Anthropic(base_url=served.url, auth_token=KEY, max_retries=0, timeout=180)
    for name in ("claude-3-5-haiku-20241022", "claude-haiku-4-5-20251001", "claude-sonnet-4-5-20250929"):
        r = bearer.beta.messages.create(model=name, max_tokens=10, messages=MSGS, betas=["prompt-caching-2024-07-31"],
                                        extra_body={"temperature": 0})
        assert r.content[0].text == ref.content[0].text, name
    with pytest.raises(anthropic.NotFoundError):  # no pattern maps it
        client.messages.create(model="claude-opus-4-1", max_tokens=4, messages=MSGS)
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=served.url, auth_token="wrong", max_retries=0).messages.create(
            model="claude-3-5-haiku-20241022", max_tokens=4, messages=MSGS)


def _sse(served, body: dict) -> list[dict]:
    with stream_lines(served.url + "/v1/messages?beta=true", body, headers={"x-api-key": KEY}) as lines:
        return [json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def test_message_start_carries_the_input_tokens(served, client):
    system = "Be brief. " + "You answer questions about colours and nothing else. " * 8
    body = {"model": "claude-sonnet-4-5", "max_tokens": 5, "stream": True, "system": system, "messages": MSGS}
    _sse(served, body)
    events = _sse(served, body)  # the same prompt again: most of it is in the cache
    start = events[0]
    assert start["type"] == "message_start"
    usage = start["message"]["usage"]
    # the prompt as the OpenAI door counts it: input (not cached) + read from the cache
    o = openai.OpenAI(base_url=served.api, api_key=KEY, max_retries=0).chat.completions.create(
        model="smollm2-135m", max_tokens=1, messages=[{"role": "system", "content": system}, *MSGS])
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == o.usage.prompt_tokens
    # the same prompt again, through the other door: the same part of it is in the cache
    assert usage["output_tokens"] == 0 and usage["cache_read_input_tokens"] == o.usage.prompt_tokens_details.cached_tokens > 40
    end = events[-2]
    assert end["type"] == "message_delta" and end["usage"]["output_tokens"] == 5
    assert end["usage"]["cache_read_input_tokens"] == usage["cache_read_input_tokens"]


def _turn(k: int) -> dict:
    """Request k of the recorded session: a fresh billing hash, the breakpoint on the newest message."""
    s = copy.deepcopy(SESSION)
    s["system"][0]["text"] = s["system"][0]["text"].format(cch=secrets.token_hex(3)[:5])
    msgs = s["messages"][: 2 * k + 1]
    msgs[-1]["content"][-1]["cache_control"] = {"type": "ephemeral"}
    msgs.insert(1, s["context_message"])
    return {"model": "claude-sonnet-4-5-20250929", "max_tokens": 4, "system": s["system"],
            "tools": s["tools"], "messages": msgs, "extra_body": {"temperature": 0, **s["fields"]}}


def test_a_recorded_session_reuses_each_previous_turn(client):
    """Every request rewrites the billing header at the very start of the system prompt and moves
    the cache_control breakpoint; each turn must still read the previous turn's prompt from cache."""
    turns = [_turn(k) for k in range(len(SESSION["messages"]) // 2 + 1)]
    client.messages.create(**{**turns[0], "model": "claude-3-5-haiku-x"})  # warm: a cold cache is not the test
    prev = None
    for body in turns:
        with client.messages.stream(**body) as s:
            u = s.get_final_message().usage
        total = u.input_tokens + u.cache_read_input_tokens
        assert total == client.messages.count_tokens(**{k: v for k, v in body.items()
                                                         if k in ("model", "system", "tools", "messages")}).input_tokens
        if prev is not None:
            # all of the previous prompt but its generation prompt ("<|im_start|>assistant\n")
            assert u.cache_read_input_tokens >= prev - 8, (u, prev)
            assert u.input_tokens < total - prev + 8
        prev = total


def test_the_billing_header_never_reaches_the_model(client):
    body = _turn(0)
    n = client.messages.count_tokens(model=body["model"], system=body["system"], messages=body["messages"])
    without = client.messages.count_tokens(model=body["model"], system=body["system"][1:], messages=body["messages"])
    assert n.input_tokens == without.input_tokens


def test_alias_that_names_another_model_is_refused_at_start():
    r = cli("serve", "smollm2-135m", "--port", "0", "--alias", "claude-*=no-such-model-here")
    assert r.returncode != 0 and "no-such-model-here" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = cli("serve", "smollm2-135m", "--port", "0", "--alias", "claude-*=")
    assert r.returncode == 2 and "PATTERN=MODEL" in r.stderr


def test_cache_control_blocks_are_accepted_everywhere_claude_code_puts_them(served):
    body = _turn(1)
    body.update(body.pop("extra_body"))
    body["tools"][-1]["cache_control"] = {"type": "ephemeral"}
    body["messages"][0]["content"][0]["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    r = post(served.url + "/v1/messages?beta=true", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["cache_creation_input_tokens"] == 0


def test_a_system_message_among_the_messages_joins_the_users_turn(client):
    """Claude Code 2.1 sends context as a ``system`` message after the first user message; chat
    templates take one system turn, first, and many want turns to alternate: it is read as part of
    the user's turn (consecutive user turns merge, as Anthropic's API merges them)."""
    ctx = SESSION["context_message"]["content"]
    n = client.messages.count_tokens(model="claude-haiku-4-5", messages=[
        {"role": "user", "content": "Say hi"}, {"role": "system", "content": ctx}]).input_tokens
    joined = client.messages.count_tokens(model="claude-haiku-4-5", messages=[
        {"role": "user", "content": "Say hi\n\n" + ctx}]).input_tokens
    assert n == joined
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="claude-haiku-4-5", messages=[{"role": "tool", "content": "x"}])
