"""Tool calling: real chat templates of each family render the tools and parse
back their own calls; grammar-constrained calls from a real model validate; the
official openai client completes a two-turn exchange; no answer is dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localllm import chat, tools as T
from tests.helpers import FIXTURES

TEMPLATES = FIXTURES / "templates"  # llama.cpp's, as bundled in llama-cpp-python 0.3.36 (README.md there)

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"},
                                                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                                                "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                        "parameters": {"type": "object", "properties": {
                                            "a": {"type": "integer"}, "b": {"type": "integer"}},
                                            "required": ["a", "b"]}}}

# real templates (llama.cpp's collection, in tests/fixtures/templates) → the family their model speaks
FAMILIES = {"Qwen-Qwen2.5-7B-Instruct": "hermes", "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": "hermes",
            "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": "hermes", "meta-llama-Llama-3.1-8B-Instruct": "llama3",
            "meta-llama-Llama-3.3-70B-Instruct": "llama3", "mistralai-Mistral-Nemo-Instruct-2407": "mistral",
            "Mistral-Small-3.2-24B-Instruct-2506": "mistral-args", "google-gemma-2-2b-it": "generic"}
ENDS = ("<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>")


def _valid(args: dict, schema: dict) -> bool:
    """The JSON-schema subset these tools use: required keys, string/integer types, enums."""
    kinds = {"string": str, "integer": int}
    props = schema["properties"]
    return (all(k in args for k in schema["required"]) and set(args) <= set(props)
            and all(isinstance(v, kinds[props[k]["type"]]) and not isinstance(v, bool) for k, v in args.items())
            and all(v in props[k]["enum"] for k, v in args.items() if "enum" in props[k]))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_real_templates_render_tools_and_their_own_calls_parse_back(name: str) -> None:
    template = (TEMPLATES / f"{name}.jinja").read_text()
    family = T.family_of(template)
    assert family == FAMILIES[name]
    spec = T.spec_from([WEATHER])
    call = {"id": "abc123XYZ", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    msgs = chat.normalize_messages([{"role": "user", "content": "Weather in Paris?"},
                                    {"role": "assistant", "content": None, "tool_calls": [call]},
                                    {"role": "tool", "tool_call_id": "abc123XYZ", "content": '{"temp": 18}'}])
    T.check_messages(msgs)
    msgs, extra = T.render_inputs(msgs, spec, family)
    out = chat.render_chat(template, msgs, bos_token="<s>", eos_token="</s>", **extra)
    assert "Current weather in a city" in out and '"enum"' in out  # the tool's description and schema reached it
    assert '{"temp": 18}' in out.replace('\\"', '"')  # and the tool's result (Llama 3.1 writes it JSON-encoded)
    # the past call, as the template wrote it, is what our parser reads back
    after = out.index("Weather in Paris?") + len("Weather in Paris?")
    start = min(i for i in (out.find(m, after) for m in ("<tool_call>", '{"name"', "[TOOL_CALLS]")) if i >= 0)
    end = min(i for i in (out.find(e, start) for e in ENDS) if i >= 0)
    parsed = T.parse(out[start:end], spec, family)
    assert parsed.error is None and len(parsed.calls) == 1, (out[start:end], parsed)
    got = parsed.calls[0]["function"]
    assert got["name"] == "get_weather" and json.loads(got["arguments"]) == {"city": "Paris", "unit": "celsius"}


@pytest.fixture(scope="module")
def model(default_model_path: Path):
    from localllm import Model

    with Model(default_model_path, n_ctx=1024) as m:
        yield m


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "mistral-args", "generic"])
def test_grammar_constrained_calls_validate_on_a_real_model(model, family: str) -> None:
    """Each family's grammar, imposed on SmolLM2, yields calls our parser reads and the schema admits."""
    for choice, prompt, want in (("required", "What is the weather in Oslo, in fahrenheit?", None),
                                 ({"type": "function", "function": {"name": "add"}}, "What is 17 plus 25?", "add")):
        spec = T.spec_from([WEATHER, ADD], choice)
        grammar = T.call_grammar(spec, family)
        out = model.complete(f"Question: {prompt}\nCall:", grammar=grammar, max_tokens=80, temperature=0)
        parsed = T.parse(out.text, spec, family)
        assert parsed.error is None and parsed.calls, (family, out.text)
        for c in parsed.calls:
            tool = spec.by_name(c["function"]["name"])
            assert tool is not None and _valid(json.loads(c["function"]["arguments"]), tool.parameters), out.text
        if want:
            assert [c["function"]["name"] for c in parsed.calls] == [want]


def test_model_door_returns_calls(model) -> None:
    c = model.chat_complete([{"role": "user", "content": "Add 2 and 3"}], tools=[ADD], tool_choice="required",
                            max_tokens=60, temperature=0)
    assert c.finish_reason == "tool_calls" and c.tool_call_error is None
    assert [t["function"]["name"] for t in c.tool_calls] == ["add"]
    assert _valid(json.loads(c.tool_calls[0]["function"]["arguments"]), ADD["function"]["parameters"])


def test_parser_never_drops_text() -> None:
    spec = T.spec_from([WEATHER])
    for text, why in (('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par', "not valid JSON"),
                      ('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', "unknown function"),
                      ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>',
                       "lacks the required argument(s) unit")):
        p = T.parse(text, spec, "hermes")
        assert p.content == text and p.calls == [] and why in p.error
    p = T.parse("Sunny. " + '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
                "</tool_call>", spec, "hermes")
    assert p.content == "Sunny." and len(p.calls) == 1
    assert T.parse("no call here", spec, "hermes").content == "no call here"


# ---------------------------------------------------------------------------- the server, with openai

@pytest.fixture(scope="module")
def client():
    openai = pytest.importorskip("openai")
    from tests.serverutil import live_server

    with live_server(model="smollm2-135m", ctx=1024) as live:
        yield openai.OpenAI(base_url=live.api, api_key="unused", max_retries=0, timeout=180), live


def _first_turn(c, stream: bool) -> dict:
    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    kw = dict(model="smollm2-135m", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=80,
              temperature=0)
    if not stream:
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        assert ch.finish_reason == "tool_calls" and ch.message.content is None
        return ch.message.model_dump(exclude_none=True)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in c.chat.completions.create(**kw, stream=True):
        ch = chunk.choices[0]
        for d in ch.delta.tool_calls or []:
            cur = calls.setdefault(d.index, {"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
            cur["id"] += d.id or ""
            cur["function"]["name"] += d.function.name or ""
            cur["function"]["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    assert finish == "tool_calls"
    return {"role": "assistant", "tool_calls": [calls[k] for k in sorted(calls)]}


@pytest.mark.parametrize("stream", [False, True])
def test_openai_client_two_turn_tool_exchange(client, stream: bool) -> None:
    c, _ = client
    msg = _first_turn(c, stream)
    call = msg["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and call["id"]
    assert _valid(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    msgs = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}, msg,
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temperature": 18, "sky": "clear"}'}]
    r = c.chat.completions.create(model="smollm2-135m", messages=msgs, tools=[WEATHER], tool_choice="none",
                                  max_tokens=30, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.choices[0].message.content
    assert not r.choices[0].message.tool_calls


def test_a_cut_off_call_comes_back_as_content_with_the_reason(client) -> None:
    c, _ = client
    r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Weather in Rome?"}],
                                  tools=[WEATHER], tool_choice="required", max_tokens=6, temperature=0)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and not ch.message.tool_calls
    assert ch.message.content.startswith("<tool_call>")
    assert "not valid JSON" in ch.model_extra["localllm"]["tool_call_error"]


def test_bad_tool_requests_are_400(client) -> None:
    from tests.serverutil import post

    _, live = client
    base = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for extra, param in (({"tools": "get_weather"}, "tools"),
                         ({"tools": [{"type": "function", "function": {"description": "no name"}}]},
                          "tools[0].function.name"),
                         ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
                          "tool_choice"),
                         ({"tools": [WEATHER], "tool_choice": "required",
                           "response_format": {"type": "json_object"}}, "tool_choice"),
                         ({"tool_choice": "required"}, "tool_choice"),
                         ({"tools": [WEATHER, WEATHER]}, "tools")):
        r = post(live.api + "/chat/completions", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        assert r.json()["error"]["param"] == param, (extra, r.json())


def test_nested_definitions_of_two_tools_do_not_collide(client) -> None:
    """pydantic writes nested models as ``$defs`` + ``$ref``; inside a call's schema they must still
    resolve, and two tools may each define a ``Item`` of their own (the grammar renames them)."""
    from pydantic import BaseModel

    class Item(BaseModel):  # the first tool's Item
        sku: str

    class Order(BaseModel):
        item: Item

    class Part(BaseModel):  # the second tool's, under the same name
        qty: int

    part_schema = {"type": "object", "properties": {"item": {"$ref": "#/$defs/Item"}}, "required": ["item"],
                   "$defs": {"Item": Part.model_json_schema()}}
    tools = [{"type": "function", "function": {"name": "order", "parameters": Order.model_json_schema()}},
             {"type": "function", "function": {"name": "count", "parameters": part_schema}}]
    assert "$defs" in tools[0]["function"]["parameters"]
    # with both tools in one grammar (tool_choice "required"), each ref still reaches its own Item
    spec = T.spec_from(tools, "required")
    params, table = T._lift_defs(list(spec.tools))
    for p, own in zip(params, (Item.model_json_schema(), Part.model_json_schema())):
        assert table[p["properties"]["item"]["$ref"].removeprefix("#/$defs/")] == own
    assert T.call_grammar(spec, "hermes")
    c, _ = client
    for name, check in (("order", lambda a: isinstance(Order.model_validate(a).item.sku, str)),
                        ("count", lambda a: isinstance(a["item"]["qty"], int) and set(a["item"]) == {"qty"})):
        r = c.chat.completions.create(model="smollm2-135m", messages=[{"role": "user", "content": "Order a bolt."}],
                                      tools=tools, tool_choice={"type": "function", "function": {"name": name}},
                                      max_tokens=60, temperature=0)
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == name and check(json.loads(call.function.arguments))
