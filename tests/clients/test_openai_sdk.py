"""The official ``openai`` SDK with the fields its current versions send and the answers they
expect (``max_completion_tokens``, ``stream_options``, ``finish_reason``, structured outputs,
``tool_choice``, ``n`` with tools), plus what Open WebUI, aider and litellm read from ``/v1/models``."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel, Field

from tests.clients.conftest import CTX, KEY
from tests.serverutil import get, post

openai = pytest.importorskip("openai")

Q = [{"role": "user", "content": "Write one sentence about the sea."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.api, api_key=KEY, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def model_id(served) -> str:
    return get(served.api + "/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"]


def _raw(served, body: dict) -> dict:
    r = post(served.api + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200, r.text
    return r.json()


def test_max_completion_tokens_caps_the_answer_as_max_tokens_does(client, served, model_id):
    """The SDK's current name for the cap (llama-cpp-python's server ignores it)."""
    r = client.chat.completions.create(model=model_id, messages=Q, max_completion_tokens=5, temperature=0)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    # the same answer as the older field, sent without the SDK (an independent path to the cap)
    old = _raw(served, {"model": model_id, "messages": Q, "max_tokens": 5, "temperature": 0})
    assert r.choices[0].message.content == old["choices"][0]["message"]["content"]
    r = client.chat.completions.create(model=model_id, messages=Q, max_completion_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 200


def test_stream_usage_comes_in_a_last_chunk_only_when_asked(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=Q, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=model_id, messages=Q, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (whole.usage.prompt_tokens, 12)
    assert all(c.usage is None for c in chunks[:-1]) and all(c.choices for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason] == ["length"]
    plain = list(client.chat.completions.create(model=model_id, messages=Q, max_tokens=12, temperature=0,
                                                stream=True))
    assert all(c.choices and c.usage is None for c in plain)


class City(BaseModel):
    name: str
    population: int


class Country(BaseModel):  # nested: the schema pydantic writes has $defs and $ref
    name: str
    capital: City
    languages: list[str] = Field(max_length=3)  # a small model would list forever


def test_structured_output_with_a_nested_pydantic_model(client, model_id):
    r = client.chat.completions.parse(model=model_id, temperature=0, max_tokens=200, response_format=Country,
                                      messages=[{"role": "user", "content": "Describe France as JSON."}])
    c = r.choices[0]
    assert c.finish_reason == "stop" and isinstance(c.message.parsed, Country)
    assert Country.model_validate_json(c.message.content) == c.message.parsed


@pytest.mark.parametrize("where", ["nested", "response_format.schema", "json_schema field"])
def test_json_schema_wherever_clients_put_it(served, model_id, where):
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4}
    body = {"model": model_id, "temperature": 0, "max_tokens": 60,
            "messages": [{"role": "user", "content": "List some numbers."}]}
    if where == "nested":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "nums", "schema": schema}}
    elif where == "response_format.schema":
        body["response_format"] = {"type": "json_schema", "schema": schema}
    else:
        body["json_schema"] = schema
    out = json.loads(_raw(served, body)["choices"][0]["message"]["content"])
    assert isinstance(out, list) and 2 <= len(out) <= 4 and all(isinstance(x, int) for x in out)


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_time"}}, "required"])
def test_object_form_and_required_tool_choice(client, model_id, choice):
    r = client.chat.completions.create(model=model_id, temperature=0, max_tokens=80, tools=[WEATHER, TIME],
                                       tool_choice=choice, parallel_tool_calls=False,
                                       messages=[{"role": "user", "content": "What time is it in Oslo?"}])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    call = c.message.tool_calls[0]
    assert call.function.name in ({"get_time"} if isinstance(choice, dict) else {"get_time", "get_weather"})
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_n_with_tools_gives_each_choice_its_own_call(client, model_id):
    r = client.chat.completions.create(model=model_id, temperature=0.9, seed=5, n=2, max_tokens=80,
                                       tools=[WEATHER], tool_choice="required",
                                       messages=[{"role": "user", "content": "Weather in Rome?"}])
    assert sorted(c.index for c in r.choices) == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls[0].function.name == "get_weather"
    ids = [c.message.tool_calls[0].id for c in r.choices]
    assert len(set(ids)) == 2  # a client keys the tool results by call id


def test_models_say_the_context_window_and_capabilities(client, served, model_id):
    card = client.models.retrieve(model_id).model_dump()
    listed = client.models.list().data[0].model_dump()
    assert card == listed
    assert card["context_length"] == card["max_model_len"] == card["max_context_length"] == CTX
    assert {"completion", "tools", "embedding"} <= set(card["capabilities"])
    # the count a client budgets with is the one the server enforces: one token more is a 400
    ids = post(served.url + "/tokenize", json={"content": "a " * 3000},
               headers={"Authorization": f"Bearer {KEY}"}).json()["tokens"][: CTX + 1]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id, prompt=ids, max_tokens=1)


def test_double_slash_and_a_trailing_slash_base_url(served, model_id):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert get(served.url + "/v1//models", headers=auth).json()["data"][0]["id"] == model_id
    r = post(served.url + "//v1//chat/completions", headers=auth,
             json={"model": model_id, "messages": Q, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    c = openai.OpenAI(base_url=served.api + "/", api_key=KEY, max_retries=0)
    assert c.models.list().data[0].id == model_id


def test_no_key_is_needed_when_none_is_set(default_model_path):
    """Open WebUI and editors send ``Authorization: Bearer`` with whatever the user typed, or nothing."""
    from tests.serverutil import live_server

    with live_server(model=default_model_path, ctx=512, parallel=1) as live:
        body = {"messages": Q, "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer sk-anything"},
                        {"x-api-key": "whatever"}):
            assert post(live.api + "/chat/completions", json=body, headers=headers).status_code == 200, headers
        c = openai.OpenAI(base_url=live.api, api_key="ollama", max_retries=0)
        r = c.chat.completions.create(model=c.models.list().data[0].id, messages=Q, max_tokens=2)
        assert r.usage.completion_tokens == 2
