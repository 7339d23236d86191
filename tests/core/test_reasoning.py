"""Reasoning: the markers a template names, the splitter parting reasoning from content however
the text is cut, the thinking budget's count, and (on the default model with a template that has
no ``enable_thinking`` switch) a budget of 0 forcing the close marker before a tool call."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from localllm.core.reasoning import CONTENT, REASONING, Budget, Markers, Splitter, Thinking, detect, template_vars
from localllm.errors import InvalidArgumentError
from tests.helpers import QWEN3_NO_SWITCH, QWEN3_STYLE, with_template

THINK = Markers("<think>", "</think>")
STORY = [{"role": "user", "content": "Write a story about a cat."}]


def split(text: str, cuts: list[int], inside: bool, markers: Markers = THINK) -> tuple[str, str]:
    """``text`` fed in pieces cut at ``cuts``: (reasoning, content), and no piece of the wrong kind."""
    s = Splitter(markers, inside=inside)
    parts = []
    for a, b in itertools.pairwise([0, *cuts, len(text)]):
        parts += s.feed(text[a:b])
    parts += s.flush()
    assert all(kind in (REASONING, CONTENT) and piece for kind, piece in parts)
    return ("".join(p for k, p in parts if k == REASONING), "".join(p for k, p in parts if k == CONTENT))


CASES = [  # (text, inside) → the split by plain string operations
    ("Let me think.\n1+1 is 2.\n</think>\n\nIt is 2.", True),
    ("\n<think>\nHm, a greeting.  \n</think>\n\nHello!  ", False),
    ("No reasoning here </think> at all", False),          # a close tag without an open one is content
    ("still thinking when it stopped  ", True),
    ("<thinking> is not the marker", False),
    ("A < B and </thin is not </think>x", True),
]


def expected(text: str, inside: bool) -> tuple[str, str]:
    body = text
    if not inside:
        if not text.lstrip().startswith("<think>"):
            return "", text
        body = text.lstrip()[len("<think>"):]
    thought, sep, answer = body.partition("</think>")
    return thought.strip(), answer.lstrip() if sep else ""


@pytest.mark.parametrize("text,inside", CASES)
def test_every_cut_gives_the_whole_split(text: str, inside: bool):
    want = expected(text, inside)
    assert split(text, [], inside) == want
    for i in range(1, len(text)):  # one cut anywhere, and every character alone
        assert split(text, [i], inside) == want, i
    assert split(text, list(range(1, len(text))), inside) == want


def test_a_partial_tag_is_held_back():
    s = Splitter(THINK, inside=True)
    assert s.feed("abc\n</th") == [(REASONING, "abc")]
    assert s.feed("ink>\n") == []
    assert s.feed("Hi") == [(CONTENT, "Hi")]
    s = Splitter(THINK)
    assert s.feed(" <thi") == [] and s.feed("nk>x") == [(REASONING, "x")]


def test_other_markers_and_detection():
    cmd = Markers("<|START_THINKING|>", "<|END_THINKING|>")
    assert detect("...<|START_THINKING|>...<|END_THINKING|>...<think></think>") == cmd
    assert detect(QWEN3_STYLE) == THINK and detect("{{ messages }}") is None and detect(None) is None
    assert split("<|START_THINKING|>plan<|END_THINKING|>answer", [3, 25], False, cmd) == ("plan", "answer")


def test_template_vars():
    assert template_vars(QWEN3_STYLE, 0) == {"enable_thinking": False}
    assert template_vars(QWEN3_NO_SWITCH, 0) == {} and template_vars(QWEN3_STYLE, 5) == {}
    assert template_vars(QWEN3_STYLE, None, {"enable_thinking": False, "x": 1}) == {"enable_thinking": False, "x": 1}
    with pytest.raises(InvalidArgumentError, match="add_generation_prompt"):
        template_vars(QWEN3_STYLE, None, {"add_generation_prompt": False})


def test_budget_counts_reasoning_tokens_only():
    b = Budget(Thinking(THINK, inside=False, close_ids=(1, 2)), 2)
    for piece in (b"<", b"think", b">"):  # opening the reasoning is not thinking yet
        assert not b.due()
        b.feed(piece)
    assert b.used == 0 and b.splitter.thinking
    b.feed(b" a")
    assert not b.due()
    b.feed(b"\xc3")  # half a character counts as a token all the same
    assert b.due() and b.used == 2
    b.feed(b"</think>", forced=True)
    assert not b.due() and b.used == 2 and b.forced
    assert not Budget(Thinking(THINK, inside=True), 0).due()  # nothing to force with: never due


@pytest.fixture(scope="module")
def no_switch_path(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_template(default_model_path, tmp_path_factory.mktemp("think") / "noswitch.gguf", QWEN3_NO_SWITCH)


@pytest.fixture(scope="module")
def no_switch(no_switch_path: Path):
    from localllm import Model

    with Model(no_switch_path, n_ctx=1024, prompt_cache=False) as m:
        yield m


def test_budget_zero_without_a_switch_forces_the_close_and_tools_still_parse(no_switch):
    m = no_switch
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                              "required": ["city"]}}}]
    assert m.render_chat(msgs).endswith("<|im_start|>assistant\n<think>\n")  # thinking cannot be switched off
    r = m.chat_complete(msgs, tools=tools, tool_choice="required", max_tokens=40, temperature=0, reasoning_budget=0)
    raw = m.detokenize(r.tokens)
    assert raw.startswith("\n</think>\n\n")  # forced first, before any sampled token
    assert r.reasoning == "" and r.finish_reason == "tool_calls"
    # the call is the text after the close marker, as the hermes-style grammar wrote it
    body = json.loads(raw.split("<tool_call>", 1)[1].split("</tool_call>", 1)[0])
    call = r.tool_calls[0]["function"]
    assert call["name"] == body["name"] == "weather"
    assert json.loads(call["arguments"]) == body["arguments"] == {"city": "Paris"}


def test_model_stream_yields_reasoning_pieces(no_switch):
    from localllm.model import Reasoning

    m, msgs = no_switch, STORY
    whole = m.chat_complete(msgs, max_tokens=24, temperature=0, reasoning_budget=6)
    pieces = list(m.chat_stream(msgs, max_tokens=24, temperature=0, reasoning_budget=6, reasoning=True))
    assert "".join(p for p in pieces if isinstance(p, Reasoning)) == whole.reasoning == m.last.reasoning
    assert "".join(p for p in pieces if not isinstance(p, Reasoning)) == whole.text and whole.text
    hidden = list(m.chat_stream(msgs, max_tokens=24, temperature=0, reasoning_budget=6))
    assert "".join(hidden) == whole.text and not any(isinstance(p, Reasoning) for p in hidden)
    raw = m.detokenize(whole.tokens)
    assert raw.split("</think>", 1)[0].strip() == whole.reasoning and len(m.tokenize(whole.reasoning, add_bos=False)) <= 6


def test_cli_run_shows_or_hides_the_reasoning(no_switch, no_switch_path: Path):
    from click.testing import CliRunner

    from localllm.cli.run import command

    whole = no_switch.chat_complete(STORY, max_tokens=24, temperature=0, reasoning_budget=6)
    args = [str(no_switch_path), STORY[0]["content"], "--temp", "0", "-n", "24", "--reasoning-budget", "6",
            "--ctx", "1024", "--no-prompt-cache"]
    shown = CliRunner().invoke(command, args, catch_exceptions=False)
    assert shown.exit_code == 0 and shown.output == whole.reasoning + "\n\n" + whole.text + "\n"
    hidden = CliRunner().invoke(command, [*args, "--hide-reasoning"], catch_exceptions=False)
    assert hidden.exit_code == 0 and hidden.output == whole.text + "\n"
