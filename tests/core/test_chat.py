"""Chat on the default model: its own template, streaming and a system prompt, a sandboxed
template, and messages that are refused."""

from __future__ import annotations

import pytest

from localllm import Model
from localllm.errors import InvalidArgumentError, TemplateError


def test_chat_uses_the_models_template(model: Model) -> None:
    text = model.render_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    answer = model.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=30, temperature=0)
    assert "4" in answer
    r = model.chat_complete([{"role": "user", "content": "Say hello."}], max_tokens=200, temperature=0)
    assert r.finish_reason == "stop"  # stopped at <|im_end|>, not at the limit
    assert "<|im_end|>" not in r.text


def test_chat_stream_and_system_prompt(model: Model) -> None:
    msgs = [{"role": "user", "content": "What is your name?"}]
    streamed = "".join(model.chat_stream(msgs, max_tokens=20, temperature=0, system="You are Bob."))
    assert streamed == model.chat(msgs, max_tokens=20, temperature=0, system="You are Bob.")
    assert "You are Bob." in model.render_chat([{"role": "system", "content": "You are Bob."}, *msgs])


def test_template_is_sandboxed(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    monkeypatch.setattr(model.engine.prompter, "template", evil)
    with pytest.raises(TemplateError):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=1)
    monkeypatch.setattr(model.engine.prompter, "template", "{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=1)


def test_bad_messages(model: Model) -> None:
    for bad in ([], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], [3]):
        with pytest.raises(InvalidArgumentError):
            model.chat(bad, max_tokens=1)  # type: ignore[arg-type]

