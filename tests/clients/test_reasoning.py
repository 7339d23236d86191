"""Reasoning models through the official clients on loopback: ``reasoning_content`` (OpenAI),
``thinking`` blocks (Anthropic), the enforced thinking budget and the template's switch.

The model is the default one (SmolLM2-135M) with a Qwen3-Thinking-style template
(``tests.helpers.QWEN3_STYLE``: the generation prompt opens ``<think>``). Its greedy
answer through plain ``/v1/completions`` on the same prompt ids is the raw text every
split is checked against, with plain string operations.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import QWEN3_STYLE, with_template
from tests.serverutil import live_server, request

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")

# a system message whose example the small model copies: it closes its reasoning itself
EXAMPLE = ("You think inside <think> </think> tags, then answer. Example:\n<think>\nThe user greets me.\n"
           "</think>\n\nHello!")
GREET = [{"role": "system", "content": EXAMPLE}, {"role": "user", "content": "Hi!"}]
STORY = [{"role": "user", "content": "Write a story about a cat."}]  # thinks on and on
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory):
    path = with_template(default_model_path, tmp_path_factory.mktemp("think") / "think.gguf", QWEN3_STYLE)
    with live_server(model=str(path), parallel=2, ctx=1024, prompt_cache=False) as live:
        yield live


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.api, api_key="x", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(oai) -> str:
    return oai.models.list().data[0].id


def _prompt_ids(server, messages: list[dict], **extra) -> list[int]:
    r = request("POST", server.url + "/tokenize", json={"messages": messages, **extra})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _raw(server, prompt, max_tokens: int, **extra) -> str:
    """The model's greedy continuation of ``prompt`` (ids) through plain /v1/completions."""
    r = request("POST", server.api + "/completions",
                json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _thinking_off(server, messages: list[dict]) -> list[int]:
    """The prompt ids of the template rendered here, with ``enable_thinking=False``, by plain Jinja2."""
    import jinja2

    text = jinja2.Environment().from_string(QWEN3_STYLE).render(messages=messages, add_generation_prompt=True,
                                                                 enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    return _tokens(server, text)


def _text(server, ids: list[int]) -> str:
    return request("POST", server.url + "/detokenize", json={"tokens": ids}).json()["content"]


def _tokens(server, text: str) -> list[int]:
    return request("POST", server.url + "/tokenize", json={"content": text}).json()["tokens"]


def test_reasoning_content_is_the_raw_answer_split_at_the_close_tag(server, oai, model_id):
    prompt = _prompt_ids(server, GREET)
    assert _text(server, prompt).endswith("<|im_start|>assistant\n<think>\n")  # the template opened it
    raw = _raw(server, prompt, 24, ignore_eos=True)
    assert "</think>" in raw
    thought, answer = raw.split("</think>", 1)
    r = oai.chat.completions.create(model=model_id, messages=GREET, max_tokens=24,
                                    extra_body={"ignore_eos": True, **GREEDY})
    m = r.choices[0].message
    assert m.reasoning_content == thought.strip()
    assert m.content == answer.lstrip() and m.content
    assert "<think>" not in m.content and "</think>" not in m.content
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 24


def test_stream_deltas_reassemble_the_answer(server, oai, model_id):
    whole = oai.chat.completions.create(model=model_id, messages=GREET, max_tokens=24,
                                        extra_body={"ignore_eos": True, **GREEDY}).choices[0].message
    thought, content = [], []
    for ch in oai.chat.completions.create(model=model_id, messages=GREET, max_tokens=24, stream=True,
                                          extra_body={"ignore_eos": True, **GREEDY}):
        d = ch.choices[0].delta if ch.choices else None
        if d is None:
            continue
        r = (d.model_extra or {}).get("reasoning_content")
        if r:
            assert not d.content  # one kind per delta
            thought.append(r)
        if d.content:
            assert "think>" not in d.content and "</" not in d.content
            content.append(d.content)
    assert len(thought) > 1 and len(content) > 1  # streamed, not sent at the end
    assert "".join(thought) == whole.reasoning_content and "".join(content) == whole.content


@pytest.mark.parametrize("field", ["reasoning_budget", "reasoning.max_tokens"])
def test_budget_forces_the_close_marker(server, oai, model_id, field):
    budget = 8
    prompt = _prompt_ids(server, STORY)
    free = _raw(server, prompt, 40)
    assert "</think>" not in free  # unbounded, it is still thinking after 40 tokens
    # llama-server's field, or OpenRouter's and Open WebUI's object
    extra = {"reasoning_budget": budget} if field == "reasoning_budget" else {"reasoning": {"max_tokens": budget}}
    r = oai.chat.completions.create(model=model_id, messages=STORY, max_tokens=30, extra_body={**extra, **GREEDY})
    m = r.choices[0].message
    first = _raw(server, prompt, budget)  # the budget's tokens are the model's own
    assert m.reasoning_content == first.strip() and len(_tokens(server, m.reasoning_content)) <= budget
    # then the close marker was written for it, and the model answered after it
    rest = _raw(server, _tokens(server, _text(server, prompt) + first + "\n</think>\n\n"), 30 - budget - 5)
    assert m.content and m.content == rest.lstrip()
    assert r.usage.completion_tokens == 30


def test_reasoning_effort_none_uses_the_template_switch(server, oai, model_id):
    off = _thinking_off(server, STORY)
    raw = _raw(server, off, 20)
    for extra in ({"reasoning_effort": "none"}, {"reasoning": {"effort": "none"}},
                  {"chat_template_kwargs": {"enable_thinking": False}}):
        r = oai.chat.completions.create(model=model_id, messages=STORY, max_tokens=20, extra_body={**extra, **GREEDY})
        m = r.choices[0].message
        assert r.usage.prompt_tokens == len(off)  # the empty think block is in the prompt
        assert m.content == raw and not getattr(m, "reasoning_content", None)


def test_bad_reasoning_fields_are_400s(oai, model_id):
    for extra, param in (({"reasoning_effort": "extreme"}, "reasoning_effort"),
                         ({"reasoning_budget": -1}, "reasoning_budget"),
                         ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs")):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=model_id, messages=STORY, max_tokens=4, extra_body=extra)
        assert e.value.body["param"] == param


@pytest.fixture(scope="module")
def claude(server):
    return anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=60)


def test_anthropic_thinking_block_then_text(server, oai, claude, model_id):
    budget = 8
    r = claude.messages.create(model=model_id, max_tokens=30, messages=STORY,
                               thinking={"type": "enabled", "budget_tokens": budget}, extra_body=GREEDY)
    assert [b.type for b in r.content] == ["thinking", "text"]
    o = oai.chat.completions.create(model=model_id, messages=STORY, max_tokens=30,
                                    extra_body={"reasoning_budget": budget, **GREEDY}).choices[0].message
    assert r.content[0].thinking == o.reasoning_content and r.content[0].signature == ""
    assert r.content[1].text == o.content
    # the thinking block goes back in the history, as clients send it
    again = claude.messages.create(model=model_id, max_tokens=4, extra_body=GREEDY, messages=[
        *STORY, {"role": "assistant", "content": [b.model_dump() for b in r.content]},
        {"role": "user", "content": "Thanks."}])
    assert again.content[-1].type == "text"


def test_anthropic_stream_yields_thinking_deltas(claude, model_id):
    kw = dict(model=model_id, max_tokens=30, messages=STORY, thinking={"type": "enabled", "budget_tokens": 8},
              extra_body=GREEDY)
    whole = claude.messages.create(**kw)
    kinds, thought, text = [], [], []
    with claude.messages.stream(**kw) as s:
        for ev in s:
            if ev.type == "content_block_start":
                kinds.append(ev.content_block.type)
            elif ev.type == "content_block_delta" and ev.delta.type == "thinking_delta":
                thought.append(ev.delta.thinking)
            elif ev.type == "content_block_delta" and ev.delta.type == "text_delta":
                text.append(ev.delta.text)
        final = s.get_final_message()
    assert kinds == ["thinking", "text"] and len(thought) > 1
    assert "".join(thought) == whole.content[0].thinking and "".join(text) == whole.content[1].text
    assert final.content[0].thinking == whole.content[0].thinking and final.content[1].text == whole.content[1].text


def test_anthropic_thinking_disabled(server, claude, model_id):
    off = _thinking_off(server, STORY)
    r = claude.messages.create(model=model_id, max_tokens=20, messages=STORY, thinking={"type": "disabled"},
                               extra_body=GREEDY)
    assert [b.type for b in r.content] == ["text"] and r.usage.input_tokens == len(off)
    assert r.content[0].text == _raw(server, off, 20)


def test_models_list_thinking_for_a_template_with_markers(oai, model_id):
    card = oai.models.retrieve(model_id).model_dump()
    assert "thinking" in card["capabilities"] and "insert" not in card["capabilities"]
