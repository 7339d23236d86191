"""Anthropic's Messages API on the same core, with the official ``anthropic``
client on loopback: the same answer as the OpenAI door for the same options.
(Sampling fields go in ``extra_body``: the current SDK no longer takes
``temperature``/``top_k`` as arguments, and the server still reads them.)"""

from __future__ import annotations

import pytest

from tests.serverutil import live_server

anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
MODEL = "smollm2-135m"
MSGS = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def server():
    with live_server(model=MODEL, parallel=2, ctx=512, api_key="k3y") as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="k3y", max_retries=0, timeout=60)


def test_message_equals_the_openai_door(server, client):
    r = client.messages.create(model=MODEL, max_tokens=12, system="Be brief.", messages=MSGS,
                               extra_body={"temperature": 0})
    assert r.type == "message" and r.role == "assistant" and r.content[0].type == "text"
    assert r.stop_reason in ("max_tokens", "end_turn") and 1 <= r.usage.output_tokens <= 12
    o = openai.OpenAI(base_url=server.api, api_key="k3y", max_retries=0).chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0, messages=[{"role": "system", "content": "Be brief."}, *MSGS])
    assert r.content[0].text == o.choices[0].message.content
    # Anthropic counts the prompt as input_tokens (not cached) + cache_read_input_tokens
    assert r.usage.input_tokens + r.usage.cache_read_input_tokens == o.usage.prompt_tokens
    assert r.usage.output_tokens == o.usage.completion_tokens
    # sampling options arrive: top_k=1 is greedy whatever the temperature
    k1 = client.messages.create(model=MODEL, max_tokens=12, system="Be brief.", messages=MSGS,
                                extra_body={"temperature": 1.0, "top_k": 1})
    assert k1.content[0].text == r.content[0].text


def test_stop_sequences_and_streaming(client):
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    r = client.messages.create(model=MODEL, max_tokens=40, messages=msgs, stop_sequences=["5"],
                               extra_body={"temperature": 0})
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "5"
    assert "4" in r.content[0].text and "5" not in r.content[0].text
    with client.messages.stream(model=MODEL, max_tokens=40, messages=msgs, stop_sequences=["5"],
                                extra_body={"temperature": 0}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == r.content[0].text
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5"
    assert final.usage.output_tokens == r.usage.output_tokens


def test_count_tokens(client):
    n = client.messages.count_tokens(model=MODEL, system="Be brief.", messages=MSGS).input_tokens
    r = client.messages.create(model=MODEL, max_tokens=1, system="Be brief.", messages=MSGS)
    assert n == r.usage.input_tokens + r.usage.cache_read_input_tokens > 5


def test_errors_in_anthropics_shape(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=0, messages=MSGS)
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="tool_choice"):
        client.messages.create(model=MODEL, max_tokens=4, messages=MSGS, tools=[WEATHER],
                               tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.BadRequestError, match="name"):
        client.messages.create(model=MODEL, max_tokens=4, messages=MSGS,
                               tools=[{"name": "bad name!", "input_schema": {"type": "object"}}])
    with pytest.raises(anthropic.NotFoundError):
        client.messages.create(model="claude-3-opus", max_tokens=4, messages=MSGS)
    bad = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        bad.messages.create(model=MODEL, max_tokens=4, messages=MSGS)
    assert e.value.body["error"]["type"] == "authentication_error"


WEATHER = {"name": "get_weather", "description": "Current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


@pytest.mark.parametrize("stream", [False, True])
def test_two_turn_tool_exchange(client, stream):
    """tool_choice any → a tool_use block with a valid input; its tool_result → a text answer."""
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    kw = dict(model=MODEL, max_tokens=60, tools=[WEATHER], tool_choice={"type": "any"}, extra_body={"temperature": 0})
    if stream:
        with client.messages.stream(messages=ask, **kw) as s:
            first = s.get_final_message()
    else:
        first = client.messages.create(messages=ask, **kw)
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "get_weather" and isinstance(uses[0].input.get("city"), str)
    assert uses[0].id.startswith("toolu_")
    turn2 = ask + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                                 "content": '{"temperature": 18}'}]}]
    r = client.messages.create(model=MODEL, max_tokens=20, messages=turn2, tools=[WEATHER],
                               tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert r.stop_reason in ("end_turn", "max_tokens") and r.content[0].type == "text" and r.content[0].text
    # count_tokens counts what the request is rendered to: the tool result, and the tools when they may be called
    n = client.messages.count_tokens(model=MODEL, messages=turn2, tools=[WEATHER], tool_choice={"type": "none"})
    assert n.input_tokens == r.usage.input_tokens + r.usage.cache_read_input_tokens
    with_tools = client.messages.count_tokens(model=MODEL, messages=turn2, tools=[WEATHER]).input_tokens
    assert with_tools > n.input_tokens + 50   # the tool's description and schema
