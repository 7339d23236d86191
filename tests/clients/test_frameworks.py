"""The agent and app frameworks people put in front of a local server, each driven for real
against ``localllm serve``: LangChain (``langchain-openai``), litellm (OpenAI and Anthropic
routes) and pydantic-ai. Each answer is checked against the same request sent with the plain
``openai`` client, so a field a framework sends and the server drops shows as a different answer."""

from __future__ import annotations

import os

import pytest
from pydantic import BaseModel, Field

from tests.clients.conftest import KEY

# litellm fetches a price table from the internet on import unless told not to: tests stay on loopback
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
openai = pytest.importorskip("openai")

Q = "Name three colours."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


class City(BaseModel):
    name: str
    population: int


class Country(BaseModel):
    name: str
    capital: City
    languages: list[str] = Field(max_length=3)


@pytest.fixture(scope="module")
def ref(served):
    """The plain openai client: the reference each framework's answer must equal."""
    c = openai.OpenAI(base_url=served.api, api_key=KEY, max_retries=0, timeout=180)
    model_id = c.models.list().data[0].id

    def answer(max_tokens: int, messages: list[dict] | None = None) -> tuple[str, int]:
        r = c.chat.completions.create(model=model_id, messages=messages or [{"role": "user", "content": Q}],
                                      max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    answer.model_id = model_id  # type: ignore[attr-defined]
    return answer


# ------------------------------------------------------------------------------------ LangChain
@pytest.fixture(scope="module")
def chat(served, ref):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(base_url=served.api, api_key=KEY, model=ref.model_id, temperature=0, max_tokens=7,
                         max_retries=0, timeout=180)


def test_langchain_invoke_and_stream(chat, ref):
    """ChatOpenAI sends ``max_completion_tokens`` (not ``max_tokens``) and ``stream_options``."""
    text, n = ref(7)
    r = chat.invoke(Q)
    assert (r.content, r.usage_metadata["output_tokens"]) == (text, n) and n == 7
    assert r.response_metadata["finish_reason"] == "length"
    chunks = list(chat.stream(Q, stream_usage=True))
    assert "".join(c.content for c in chunks) == text
    usage = [c.usage_metadata for c in chunks if c.usage_metadata]
    assert len(usage) == 1 and usage[0]["output_tokens"] == 7


def test_langchain_tools_with_a_named_tool_choice(chat):
    bound = chat.model_copy(update={"max_tokens": 60}).bind_tools([WEATHER], tool_choice="get_weather")
    msg = bound.invoke("Is it raining in Paris?")
    assert [c["name"] for c in msg.tool_calls] == ["get_weather"]
    assert isinstance(msg.tool_calls[0]["args"]["city"], str) and msg.tool_calls[0]["id"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output_with_a_nested_model(chat, method):
    out = chat.model_copy(update={"max_tokens": 200}).with_structured_output(Country, method=method).invoke(
        "Describe France.")
    assert isinstance(out, Country) and isinstance(out.capital, City)


# ------------------------------------------------------------------------------------ litellm
def test_litellm_openai_route(served, ref):
    litellm = pytest.importorskip("litellm")
    text, n = ref(6)
    r = litellm.completion(model="openai/" + ref.model_id, api_base=served.api, api_key=KEY, temperature=0,
                           messages=[{"role": "user", "content": Q}], max_completion_tokens=6)
    assert (r.choices[0].message.content, r.usage.completion_tokens) == (text, n)
    parts = litellm.completion(model="openai/" + ref.model_id, api_base=served.api, api_key=KEY, temperature=0,
                               messages=[{"role": "user", "content": Q}], max_tokens=6, stream=True,
                               stream_options={"include_usage": True})
    chunks = list(parts)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    r = litellm.completion(model="openai/" + ref.model_id, api_base=served.api, api_key=KEY, temperature=0,
                           messages=[{"role": "user", "content": "Weather in Rome?"}], tools=[WEATHER],
                           tool_choice="required", max_tokens=60)
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather"


def test_litellm_anthropic_route_reaches_the_mapped_model(served, ref):
    """litellm's ``anthropic/`` provider speaks /v1/messages with x-api-key, under a Claude name."""
    litellm = pytest.importorskip("litellm")
    text, _ = ref(6)
    r = litellm.completion(model="anthropic/claude-3-5-haiku-20241022", api_base=served.url, api_key=KEY,
                           messages=[{"role": "user", "content": Q}], max_tokens=6, temperature=0)
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens == 6


# ------------------------------------------------------------------------------------ pydantic-ai
@pytest.fixture(scope="module")
def pai_model(served, ref):
    pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    return OpenAIChatModel(ref.model_id, provider=OpenAIProvider(base_url=served.api, api_key=KEY))


def test_pydantic_ai_text_run_equals_the_plain_answer(pai_model, ref):
    from pydantic_ai import Agent

    text, _ = ref(8)
    r = Agent(pai_model).run_sync(Q, model_settings={"temperature": 0, "max_tokens": 8})
    assert r.output == text and r.usage.output_tokens == 8


def test_pydantic_ai_structured_output_through_a_required_tool(pai_model):
    """pydantic-ai asks for structured output as a tool call it requires (tool_choice "required")."""
    from pydantic_ai import Agent

    r = Agent(pai_model, output_type=Country).run_sync("Describe France.",
                                                       model_settings={"temperature": 0, "max_tokens": 200})
    assert isinstance(r.output, Country) and isinstance(r.output.capital, City)
