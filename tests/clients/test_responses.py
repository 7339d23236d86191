"""OpenAI's Responses API with the official ``openai`` client (``client.responses.create`` / ``.stream``)
on loopback: every answer equals the greedy answer of the same conversation through
``/v1/chat/completions`` (an independent door), token counts included; ``previous_response_id``
continues a kept conversation, within the store's bounds; tools round-trip; bad input is a 400."""

from __future__ import annotations

import json

import pytest

from localllm.server.responses_store import ResponseStore, Stored
from tests.serverutil import get, live_server, post, request

openai = pytest.importorskip("openai")
KEEP = 4  # the server's responses_max_stored
ASK = "Name three colours."
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


@pytest.fixture(scope="module")
def live(default_model_path):
    with live_server(model=default_model_path, parallel=2, ctx=1024, responses_max_stored=KEEP) as lv:
        yield lv


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.api, api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _chat(client, model, messages, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def test_text_equals_the_chat_completion_and_is_kept(client, model):
    r = client.responses.create(model=model, input=ASK, max_output_tokens=40, temperature=0)
    c = _chat(client, model, [{"role": "user", "content": ASK}], max_tokens=40)
    assert r.object == "response" and r.model == c.model and r.id.startswith("resp_")
    assert r.output_text == c.choices[0].message.content and r.output_text
    assert [o.type for o in r.output] == ["message"] and r.output[0].role == "assistant"
    assert r.status == ("incomplete" if c.choices[0].finish_reason == "length" else "completed")
    assert (r.usage.input_tokens, r.usage.output_tokens) == (c.usage.prompt_tokens, c.usage.completion_tokens)
    assert r.usage.total_tokens == c.usage.total_tokens and r.usage.input_tokens_details.cached_tokens >= 0
    assert (r.temperature, r.max_output_tokens, r.store) == (0.0, 40, True)
    again = client.responses.retrieve(r.id)
    assert again.id == r.id and again.output_text == r.output_text and again.usage == r.usage


def test_stream_deltas_equal_the_final_text(client, model):
    kw = dict(model=model, input="Say hello.", max_output_tokens=60, temperature=0)
    with client.responses.stream(**kw) as s:
        events = list(s)
        final = s.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == final.output_text
    assert final.output_text == client.responses.create(**kw).output_text
    kinds = [e.type for e in events]
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * len(deltas)
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "response.completed"])
    assert [e.sequence_number for e in events] == list(range(len(events)))
    done = next(e for e in events if e.type == "response.output_text.done")
    assert done.text == final.output_text and done.item_id == final.output[0].id
    assert final.status == "completed" and final.usage.output_tokens == len(deltas)


def test_instructions_and_developer_messages_are_the_system_message(client, model):
    system = "You are a pirate. Answer in one sentence."
    c = _chat(client, model, [{"role": "system", "content": system}, {"role": "user", "content": ASK}], max_tokens=30)
    r = client.responses.create(model=model, instructions=system, input=ASK, max_output_tokens=30, temperature=0)
    assert r.output_text == c.choices[0].message.content and r.instructions == system
    assert r.usage.input_tokens == c.usage.prompt_tokens
    items = [{"role": "developer", "content": [{"type": "input_text", "text": system}]},
             {"type": "message", "role": "user", "content": [{"type": "input_text", "text": ASK}]}]
    d = client.responses.create(model=model, input=items, max_output_tokens=30, temperature=0)
    assert d.output_text == r.output_text and d.usage.input_tokens == r.usage.input_tokens


def test_previous_response_id_continues_the_conversation(client, model):
    first = "My name is Ana and I like green."
    r1 = client.responses.create(model=model, instructions="Be brief.", input=first, max_output_tokens=20,
                                 temperature=0)
    r2 = client.responses.create(model=model, previous_response_id=r1.id, input="What is my name?",
                                 max_output_tokens=20, temperature=0)
    # the conversation, not r1's instructions (OpenAI does not carry them over)
    msgs = [{"role": "user", "content": first}, {"role": "assistant", "content": r1.output_text},
            {"role": "user", "content": "What is my name?"}]
    c = _chat(client, model, msgs, max_tokens=20)
    assert r2.previous_response_id == r1.id and r2.instructions is None
    assert r2.output_text == c.choices[0].message.content
    assert r2.usage.input_tokens == c.usage.prompt_tokens > r1.usage.input_tokens + r1.usage.output_tokens - 8
    # the same conversation sent as items (the assistant's turn as output_text) is the same prompt
    items = [{"role": "user", "content": first},
             {"role": "assistant", "content": [{"type": "output_text", "text": r1.output_text}]},
             {"role": "user", "content": "What is my name?"}]
    r3 = client.responses.create(model=model, input=items, max_output_tokens=20, temperature=0)
    assert (r3.output_text, r3.usage.input_tokens) == (r2.output_text, r2.usage.input_tokens)
    # the continuation reuses the first turn's prompt cache, and says so
    assert 0 < r2.usage.input_tokens_details.cached_tokens < r2.usage.input_tokens
    # a third turn on r2 grows again by r2's answer and the new question
    r4 = client.responses.create(model=model, previous_response_id=r2.id, input="And my colour?",
                                 max_output_tokens=5, temperature=0)
    c4 = _chat(client, model, msgs + [{"role": "assistant", "content": r2.output_text},
                                      {"role": "user", "content": "And my colour?"}], max_tokens=5)
    assert r4.usage.input_tokens == c4.usage.prompt_tokens and r4.output_text == c4.choices[0].message.content


def _not_found(client, model, rid):
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(model=model, previous_response_id=rid, input="Hi", max_output_tokens=2)
    err = e.value.body
    assert (err["code"], err["param"]) == ("previous_response_not_found", "previous_response_id")
    assert err["message"] == f"Previous response with id '{rid}' not found."
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(rid)


def test_store_false_and_deleted_responses_cannot_be_continued(client, model, live):
    r = client.responses.create(model=model, input="Hi", max_output_tokens=2, store=False)
    assert r.store is False and r.output_text
    _not_found(client, model, r.id)
    _not_found(client, model, "resp_0123456789")
    kept = client.responses.create(model=model, input="Hi", max_output_tokens=2)
    client.responses.retrieve(kept.id)
    assert request("DELETE", f"{live.api}/responses/{kept.id}").json() == {"id": kept.id, "object": "response",
                                                                           "deleted": True}
    _not_found(client, model, kept.id)
    assert request("DELETE", f"{live.api}/responses/{kept.id}").status_code == 404


def test_the_store_keeps_the_newest_max_stored(client, model, live):
    assert live.app.extensions["localllm"].responses.max_count == KEEP
    ids = [client.responses.create(model=model, input=f"Count to {i}", max_output_tokens=1).id for i in range(KEEP + 1)]
    _not_found(client, model, ids[0])
    for rid in ids[1:]:
        assert client.responses.retrieve(rid).id == rid
    r = client.responses.create(model=model, previous_response_id=ids[-1], input="Go on", max_output_tokens=1)
    assert r.previous_response_id == ids[-1]


def test_the_store_forgets_by_age_and_count():
    now = [0.0]
    s = ResponseStore(max_count=3, max_age=10.0, clock=lambda: now[0])
    s.put("a", Stored([], {}))
    now[0] = 6.0
    s.put("b", Stored([], {}))
    now[0] = 10.5  # a is 10.5 s old, b 4.5 s
    assert s.get("a") is None and s.get("b") is not None and len(s) == 1
    for k in "cde":
        s.put(k, Stored([], {}))
    assert [k for k in "bcde" if s.get(k)] == ["c", "d", "e"]
    assert ResponseStore(0, 10.0).put("x", Stored([], {})) is None and len(ResponseStore(0, 10.0)) == 0


def test_max_output_tokens_makes_it_incomplete(client, model):
    r = client.responses.create(model=model, input="Write a long story about a dragon.", max_output_tokens=3,
                                temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model=model, input="Write a long story about a dragon.",
                                          max_output_tokens=3, temperature=0, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == r.output_text
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_function_call_round_trip(client, model, stream):
    ask = "What is the weather in Paris?"
    kw = dict(model=model, tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
              max_output_tokens=60, temperature=0)
    if stream:
        with client.responses.stream(input=ask, **kw) as s:
            kinds = [e.type for e in s]
            r1 = s.get_final_response()
        assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    else:
        r1 = client.responses.create(input=ask, **kw)
    calls = [o for o in r1.output if o.type == "function_call"]
    assert [o.type for o in r1.output] == ["function_call"] and r1.status == "completed"
    c1 = _chat(client, model, [{"role": "user", "content": ask}], tools=[CHAT_WEATHER], max_tokens=60,
               tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == json.loads(c1.choices[0].message.tool_calls[0].function.arguments)
    assert isinstance(json.loads(calls[0].arguments)["city"], str) and calls[0].call_id
    out = {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"temperature": 18}'}
    r2 = client.responses.create(model=model, previous_response_id=r1.id, input=[out], tools=[WEATHER],
                                 tool_choice="none", max_output_tokens=20, temperature=0)
    call = {"id": calls[0].call_id, "type": "function",
            "function": {"name": "get_weather", "arguments": calls[0].arguments}}
    c2 = _chat(client, model, [{"role": "user", "content": ask}, {"role": "assistant", "content": None,
                                                                   "tool_calls": [call]},
                               {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18}'}],
               tools=[CHAT_WEATHER], tool_choice="none", max_tokens=20)
    assert r2.output_text == c2.choices[0].message.content and r2.output_text
    assert r2.usage.input_tokens == c2.usage.prompt_tokens
    # the same turn with the call sent back as an item instead of previous_response_id
    items = [{"role": "user", "content": ask}, {"type": "function_call", "call_id": calls[0].call_id,
                                                "name": "get_weather", "arguments": calls[0].arguments}, out]
    r3 = client.responses.create(model=model, input=items, tools=[WEATHER], tool_choice="none",
                                 max_output_tokens=20, temperature=0)
    assert (r3.output_text, r3.usage.input_tokens) == (r2.output_text, r2.usage.input_tokens)


def test_call_items_join_the_assistant_turn_they_follow(client, model):
    """An assistant message and the function_call items after it are one assistant turn (text and
    tool_calls), as chat completions renders it: the same prompt tokens."""
    calls = [{"type": "function_call", "call_id": f"call_{k}", "name": "get_weather",
              "arguments": json.dumps({"city": city})} for k, city in enumerate(["Paris", "Rome"])]
    outs = [{"type": "function_call_output", "call_id": c["call_id"], "output": f'{{"temperature": {t}}}'}
            for c, t in zip(calls, (18, 24))]
    items = [{"role": "user", "content": "Weather in Paris and Rome?"},
             {"role": "assistant", "content": "Let me check."}, *calls, *outs]
    r = client.responses.create(model=model, input=items, tools=[WEATHER], tool_choice="none",
                                max_output_tokens=12, temperature=0)
    turn = {"role": "assistant", "content": "Let me check.", "tool_calls": [
        {"id": c["call_id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}
    tools = [{"role": "tool", "tool_call_id": o["call_id"], "content": o["output"]} for o in outs]
    c = _chat(client, model, [items[0], turn, *tools], tools=[CHAT_WEATHER], tool_choice="none", max_tokens=12)
    assert r.usage.input_tokens == c.usage.prompt_tokens and r.output_text == c.choices[0].message.content


BAD = [({"input": 5}, "input"), ({"input": []}, "input"), ({"input": None}, "input"),
       ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
       ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
       ({"input": [{"role": "user", "content": 7}]}, "input[0].content"),
       ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
       ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0].call_id"),
       ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
       ({"tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
       ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
       ({"tools": [WEATHER], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
       ({"tool_choice": "required"}, "tool_choice"),
       ({"max_output_tokens": 0}, "max_output_tokens"), ({"temperature": 3}, "temperature"),
       ({"text": {"format": {"type": "xml"}}}, "text.format"), ({"instructions": ["x"]}, "instructions"),
       ({"previous_response_id": 5}, "previous_response_id"), ({"stream": "yes"}, "stream"),
       ({"store": "no"}, "store"), ({"background": True}, "background"), ({"metadata": "x"}, "metadata")]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_input_is_a_400_naming_the_field(live, model, extra, param):
    body = {"model": model, "input": "hi", "max_output_tokens": 2, **extra}
    r = post(live.api + "/responses", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == (param, "invalid_request_error") and param.split("[")[0] in err["message"]


def test_errors_through_the_client(client, model, live):
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        client.responses.create(model=model, input="hi", max_output_tokens=0)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="gpt-4o", input="hi")
    assert get(live.api + "/responses/resp_nope").status_code == 404
    assert post(live.api + "/responses", content=b"{nope", headers={"Content-Type": "application/json"}
                ).status_code == 400


def test_json_schema_text_format(client, model):
    schema = {"type": "object", "properties": {"colour": {"type": "string"}}, "required": ["colour"]}
    r = client.responses.create(model=model, input="Name a colour as JSON.", max_output_tokens=40, temperature=0,
                                text={"format": {"type": "json_schema", "name": "c", "schema": schema}})
    c = _chat(client, model, [{"role": "user", "content": "Name a colour as JSON."}], max_tokens=40,
              response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert r.output_text == c.choices[0].message.content
    assert isinstance(json.loads(r.output_text)["colour"], str) and r.text.format.type == "json_schema"
