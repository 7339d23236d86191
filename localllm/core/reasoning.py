"""Reasoning models: their thinking markers, the splitter that parts generated text into
reasoning and content, and the thinking budget the scheduler enforces.

A model that thinks writes ``<think>…</think>`` (Qwen3, DeepSeek-R1 distills) or its
template's own markers before its answer; some templates open the marker in the prompt
(the answer then starts inside the reasoning). Reasoning is recognised only at the start
of an answer; its surrounding whitespace and the whitespace after the close marker are
dropped, as llama-server does.

Example:
    >>> m = detect("{{ '<think>' }}...{{ '</think>' }}")
    >>> s = Splitter(m, inside=True)
    >>> s.feed("Let me see.\\n</th") + s.feed("ink>\\n\\nHello") + s.flush()
    [('reasoning', 'Let me see.'), ('content', 'Hello')]
"""

from __future__ import annotations

import codecs
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from localllm.errors import InvalidArgumentError

# (open, close) marker pairs, the more specific first: a template that has both is that model's
MARKERS: tuple[tuple[str, str], ...] = (
    ("<seed:think>", "</seed:think>"),
    ("<|START_THINKING|>", "<|END_THINKING|>"),
    ("<think>", "</think>"),
)
# OpenAI's reasoning_effort → a thinking budget in tokens ("none": no thinking at all)
EFFORT_BUDGETS: dict[str, int] = {"none": 0, "minimal": 256, "low": 1024, "medium": 4096, "high": 16384}
SWITCH = "enable_thinking"  # the template variable that turns thinking off (Qwen3's)
# variables a request may not set through chat_template_kwargs: the renderer's own
RESERVED_VARS = frozenset({"messages", "add_generation_prompt", "bos_token", "eos_token", "tools"})

REASONING, CONTENT = "reasoning", "content"
_START, _THINK, _ANSWER = 0, 1, 2


@dataclass(frozen=True)
class Markers:
    """The text that opens and closes a model's reasoning."""

    open: str
    close: str

    @property
    def forced(self) -> str:
        """What the budget writes when it ends the reasoning: the close marker on a line of its
        own, then the blank line templates put before the answer."""
        return f"\n{self.close}\n\n"


@dataclass(frozen=True)
class Thinking:
    """How a request's answer carries reasoning: the markers, whether the prompt left the answer
    inside the reasoning (the template opened it), and the token ids of :attr:`Markers.forced`."""

    markers: Markers
    inside: bool = False
    close_ids: tuple[int, ...] = ()


def detect(template: str | None) -> Markers | None:
    """The reasoning markers a chat template writes or expects, or None (no reasoning).

    Example:
        >>> detect("{% if x %}<|START_THINKING|>{% endif %}<|END_THINKING|>")
        Markers(open='<|START_THINKING|>', close='<|END_THINKING|>')
        >>> detect("{{ '<|im_start|>assistant' }}") is None
        True
    """
    if not template:
        return None
    for open_, close in MARKERS:
        if open_ in template and close in template:
            return Markers(open_, close)
    return None


def has_switch(template: str | None) -> bool:
    """Whether the template turns thinking off with ``enable_thinking=false``."""
    return bool(template) and SWITCH in str(template)


def template_vars(template: str | None, budget: int | None,
                  asked: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Extra variables for the chat template: ``enable_thinking=False`` where the budget is 0 and
    the template has the switch, then the request's own ``chat_template_kwargs`` (``asked``).

    Example:
        >>> template_vars("{% if enable_thinking is false %}<think></think>{% endif %}", 0)
        {'enable_thinking': False}
        >>> template_vars("{{ messages }}", 0), template_vars("enable_thinking", None)
        ({}, {})
    """
    out: dict[str, Any] = {SWITCH: False} if budget == 0 and has_switch(template) else {}
    if asked is None:
        return out
    if not isinstance(asked, Mapping) or not all(isinstance(k, str) for k in asked):
        raise InvalidArgumentError("chat_template_kwargs must be an object", param="chat_template_kwargs")
    bad = sorted(RESERVED_VARS.intersection(asked))
    if bad:
        raise InvalidArgumentError(f"chat_template_kwargs cannot set {bad[0]!r} (the server sets it)",
                                   param="chat_template_kwargs")
    return {**out, **asked}


def starts_inside(prompt_tail: str, markers: Markers) -> bool:
    """Whether a prompt ending in ``prompt_tail`` leaves the answer inside the reasoning
    (its generation prompt opened the marker, as DeepSeek-R1's and Qwen3-Thinking's do).

    Example:
        >>> m = Markers("<think>", "</think>")
        >>> starts_inside("<|im_start|>assistant\\n<think>\\n", m), starts_inside("<think>\\n\\n</think>\\n\\n", m)
        (True, False)
    """
    return prompt_tail.rstrip().endswith(markers.open)


def effort_budget(effort: Any) -> int:
    """OpenAI's ``reasoning_effort`` as a thinking budget (see :data:`EFFORT_BUDGETS`).

    Example:
        >>> effort_budget("low")
        1024
    """
    if not isinstance(effort, str) or effort not in EFFORT_BUDGETS:
        raise InvalidArgumentError(f"reasoning_effort must be one of {', '.join(EFFORT_BUDGETS)}",
                                   param="reasoning_effort")
    return EFFORT_BUDGETS[effort]


def _partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper start of ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class Splitter:
    """Generated text → ``(kind, text)`` pieces, kind ``"reasoning"`` or ``"content"``, as it streams.
    Text that may still become a marker (``"</th"``) or whitespace that may end the reasoning is
    held back until the next piece or :meth:`flush`; the pieces of one answer join to the same
    reasoning and content however the text was cut."""

    def __init__(self, markers: Markers, *, inside: bool = False) -> None:
        self.markers = markers
        self.state = _THINK if inside else _START
        self._lead = True       # whitespace at the start of the current part is dropped
        self._buf = ""

    @property
    def thinking(self) -> bool:
        """Inside the reasoning now."""
        return self.state == _THINK

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        out: list[tuple[str, str]] = []
        while True:
            if self.state == _START and not self._start():
                return out
            if self.state == _THINK:
                if not self._think(out):
                    return out
                continue
            if self.state == _ANSWER:
                self._answer(out)
                return out

    def _start(self) -> bool:
        """Before the answer's first visible text: does it open the reasoning? False: wait for more."""
        s = self._buf.lstrip()
        if not s or (len(s) < len(self.markers.open) and self.markers.open.startswith(s)):
            return False
        if s.startswith(self.markers.open):
            self._buf, self.state, self._lead = s[len(self.markers.open):], _THINK, True
        else:
            self.state, self._lead = _ANSWER, False  # no reasoning: the text is the answer, as it is
        return True

    def _think(self, out: list[tuple[str, str]]) -> bool:
        """Release reasoning; True when the close marker moved on to the answer."""
        if self._lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._lead = False
        close = self.markers.close
        i = self._buf.find(close)
        if i >= 0:
            part = self._buf[:i].rstrip()
            if part:
                out.append((REASONING, part))
            self._buf, self.state, self._lead = self._buf[i + len(close):], _ANSWER, True
            return True
        keep = _partial_suffix(self._buf, close)
        body = self._buf[:len(self._buf) - keep]
        part = body.rstrip()  # whitespace is held: it may be the last before the close marker
        if part:
            out.append((REASONING, part))
        self._buf = self._buf[len(part):]
        return False

    def _answer(self, out: list[tuple[str, str]]) -> None:
        if self._lead:
            self._buf = self._buf.lstrip()
            if not self._buf:
                return
            self._lead = False
        if self._buf:
            out.append((CONTENT, self._buf))
        self._buf = ""

    def flush(self) -> list[tuple[str, str]]:
        """The text held back, at the end of the answer."""
        buf, self._buf = self._buf, ""
        if self.state == _THINK:
            part = buf.strip() if self._lead else buf.rstrip()
            return [(REASONING, part)] if part else []
        if self.state == _ANSWER and self._lead:
            buf = buf.lstrip()
        return [(CONTENT, buf)] if buf else []


class Budget:
    """One choice's thinking budget: counts the tokens generated inside the reasoning and says
    when the close marker must be forced (:meth:`due`); the scheduler feeds every token's bytes."""

    def __init__(self, thinking: Thinking, budget: int) -> None:
        self.thinking = thinking
        self.budget = budget
        self.splitter = Splitter(thinking.markers, inside=thinking.inside)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.used = 0    # tokens generated inside the reasoning
        self.forced = False

    def due(self) -> bool:
        """The budget is spent and the reasoning is still open: force :attr:`Thinking.close_ids`."""
        return self.splitter.thinking and self.used >= self.budget and bool(self.thinking.close_ids)

    def feed(self, piece: bytes, *, forced: bool = False) -> None:
        """A token taken into the answer (``forced``: one of the close marker's)."""
        if self.splitter.thinking and not forced:
            self.used += 1
        self.forced = self.forced or forced
        self.splitter.feed(self._decoder.decode(piece))


__all__ = ["Markers", "Thinking", "Splitter", "Budget", "detect", "has_switch", "template_vars", "starts_inside",
           "effort_budget", "EFFORT_BUDGETS", "MARKERS", "REASONING", "CONTENT"]
