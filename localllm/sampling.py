"""``SamplingParams``: how one request samples and stops, validated in one place.

Every door builds one: ``Model`` from keyword arguments, ``localllm run``
from its flags, the HTTP API from a JSON body. The limits below are the only
ones; the CLI's option ranges are made from them too.

Example:
    >>> p = SamplingParams(temperature=0, max_tokens=8, stop="\\n")
    >>> (p.temperature, p.max_tokens, p.stop, p.greedy)
    (0.0, 8, ('\\n',), True)
    >>> SamplingParams(top_p=0)
    Traceback (most recent call last):
    ...
    localllm.errors.InvalidArgumentError: top_p must be in (0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypedDict

from localllm.errors import InvalidArgumentError

MAX_BEAMS = 8            # beams of one request (each beam is a sequence in the shared batch)
MAX_N = 16               # n / best_of of one request (each choice is a sequence)
MAX_STOPS = 16           # stop strings of one request
MAX_STOP_CHARS = 1024    # characters of one stop string (each is checked against every token)
MAX_TOP_LOGPROBS = 20    # OpenAI's limit for chat top_logprobs
MAX_LOGIT_BIAS = 1024    # entries in logit_bias
MAX_GRAMMAR_CHARS = 1 << 16

# (low, high, low is open): the one table of numeric ranges
LIMITS: dict[str, tuple[float, float, bool]] = {
    "temperature": (0.0, 2.0, False),
    "top_p": (0.0, 1.0, True),
    "min_p": (0.0, 1.0, False),
    "repeat_penalty": (0.01, 10.0, False),  # llama.cpp divides by it: no denormal near 0
    "presence_penalty": (-2.0, 2.0, False),
    "frequency_penalty": (-2.0, 2.0, False),
}
INT_LIMITS: dict[str, tuple[int, int | None]] = {
    "max_tokens": (1, None),
    "top_k": (0, (1 << 31) - 1),  # an int32 in C
    "repeat_last_n": (0, 1 << 20),
    "n": (1, MAX_N),
    "best_of": (1, MAX_N),
    "num_beams": (1, MAX_BEAMS),
    "top_logprobs": (0, MAX_TOP_LOGPROBS),
    "reasoning_budget": (0, None),
}


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} {msg}", param=param)


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, "must be a finite number")
    lo, hi, lo_open = LIMITS[name]
    if v < lo or v > hi or (lo_open and v == lo):
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo:g}, {hi:g}]")
    return float(v)


def _integer(name: str, v: Any) -> int:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, "must be an integer")
    lo, hi = INT_LIMITS[name]
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"must be >= {lo}" if hi is None else f"must be in {lo}..{hi}")
    return v


@dataclass(frozen=True)
class SamplingParams:
    """Sampling and stopping for one request. Invalid values raise
    :class:`~localllm.errors.InvalidArgumentError` naming the field.

    - ``temperature`` 0 is greedy; ``seed`` makes sampling reproducible
      (choice ``i`` of ``n`` uses ``seed + i``).
    - ``repeat_penalty``, ``presence_penalty`` and ``frequency_penalty`` are
      llama.cpp's penalty sampler over the last ``repeat_last_n`` tokens
      (prompt included).
    - ``grammar`` (GBNF) or ``json_schema`` constrain the output.
    - ``logprobs`` returns each token's log-probability (log-softmax of the
      model's logits) and its ``top_logprobs`` alternatives.
    - ``n`` choices, ``best_of`` candidates ranked by mean log-probability,
      or ``num_beams`` beam search (deterministic: temperature does not apply).
    - ``reasoning_budget``: a reasoning model thinks at most this many tokens, then its
      close marker is written for it and the answer follows (0: no thinking; the template's
      switch turns it off where it has one). None: as long as it likes.
    """

    max_tokens: int | None = 256
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None
    json_schema: Any = None
    logit_bias: Mapping[int, float] | None = None
    ignore_eos: bool = False
    n: int = 1
    best_of: int | None = None
    num_beams: int = 1
    logprobs: bool = False
    top_logprobs: int = 0
    reasoning_budget: int | None = None
    _grammar_text: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.max_tokens is not None:
            set_(self, "max_tokens", _integer("max_tokens", self.max_tokens))
        for name in LIMITS:
            set_(self, name, _number(name, getattr(self, name)))
        for name in ("top_k", "repeat_last_n", "n", "num_beams", "top_logprobs"):
            set_(self, name, _integer(name, getattr(self, name)))
        if self.reasoning_budget is not None:
            set_(self, "reasoning_budget", _integer("reasoning_budget", self.reasoning_budget))
        set_(self, "best_of", self.n if self.best_of is None else _integer("best_of", self.best_of))
        if self.best_of < self.n:
            raise _bad("best_of", "must be >= n")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int):
                raise _bad("seed", "must be an integer")
            set_(self, "seed", self.seed & 0xFFFFFFFF)
        set_(self, "stop", _stops(self.stop))
        for name in ("ignore_eos", "logprobs"):
            if not isinstance(getattr(self, name), bool):
                raise _bad(name, "must be true or false")
        if self.top_logprobs and not self.logprobs:
            raise _bad("top_logprobs", "needs logprobs to be true")
        self._check_grammar()
        set_(self, "logit_bias", _logit_bias(self.logit_bias))
        self._check_beams()

    def _check_grammar(self) -> None:
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                raise _bad("grammar", "must be a string (GBNF)")
            if len(self.grammar) > MAX_GRAMMAR_CHARS:
                raise _bad("grammar", f"is longer than {MAX_GRAMMAR_CHARS} characters")
            if not self.grammar.strip():
                object.__setattr__(self, "grammar", None)
        if self.ignore_eos and (self.grammar is not None or self.json_schema is not None):
            # a finished grammar allows only end-of-generation; banning it would leave no token at all
            raise _bad("ignore_eos", "cannot be combined with a grammar or JSON schema: a grammar ends by "
                                     "ending the generation")
        if self.json_schema is not None:
            if self.grammar is not None:
                raise _bad("grammar", "cannot be combined with a JSON schema (response_format)")
            if not isinstance(self.json_schema, (Mapping, bool)):
                raise _bad("json_schema", "must be a JSON schema object")

    def _check_beams(self) -> None:
        if self.num_beams == 1:
            return
        # beam search keeps the K most likely continuations: these options have no meaning there
        if self.n > 1 or self.best_of > 1:
            raise _bad("num_beams", "cannot be combined with n or best_of (beam search returns one choice)")
        for name in ("repeat_penalty", "presence_penalty", "frequency_penalty"):
            if getattr(self, name) != (1.0 if name == "repeat_penalty" else 0.0):
                raise _bad("num_beams", f"cannot be combined with {name}: beam search ranks by the model's "
                                        "own log-probabilities")
        if self.logit_bias:
            raise _bad("num_beams", "cannot be combined with logit_bias: beam search ranks by the model's "
                                    "own log-probabilities")
        if self.reasoning_budget is not None:
            raise _bad("num_beams", "cannot be combined with reasoning_budget (beam search writes no forced tokens)")

    # ---------------------------------------------------------------- derived
    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def width(self) -> int:
        """Sequences this request occupies at once."""
        return max(self.n, self.best_of, self.num_beams)

    def grammar_text(self) -> str | None:
        """The GBNF to constrain with (``json_schema`` converted once), or None."""
        if self.grammar is not None:
            return self.grammar
        if self.json_schema is None:
            return None
        if not self._grammar_text:
            from localllm import runtime

            if self.json_schema is True or self.json_schema == {}:
                self._grammar_text.append(runtime.json_grammar())
            else:
                self._grammar_text.append(runtime.json_schema_to_grammar(self.json_schema))
        return self._grammar_text[0]

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with ``changes`` (validated again)."""
        return replace(self, **changes)

    @classmethod
    def names(cls) -> list[str]:
        """The public field names (what a door may pass)."""
        return [f.name for f in fields(cls) if not f.name.startswith("_")]


class SamplingKwargs(TypedDict, total=False):
    """The keyword arguments ``Model``'s generation methods take (see :class:`SamplingParams`)."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    repeat_penalty: float
    presence_penalty: float
    frequency_penalty: float
    repeat_last_n: int
    seed: int | None
    stop: str | list[str] | tuple[str, ...] | None
    grammar: str | None
    json_schema: Any
    logit_bias: Mapping[int, float] | None
    ignore_eos: bool
    n: int
    best_of: int | None
    num_beams: int
    logprobs: bool
    top_logprobs: int
    reasoning_budget: int | None


def _stops(stop: Any) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", f"must be a string or a list of at most {MAX_STOPS} strings")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise _bad("stop", f"strings must be at most {MAX_STOP_CHARS} characters")
    return tuple(s for s in stops if s)


def _logit_bias(bias: Any) -> dict[int, float] | None:
    if bias is None or bias == {}:
        return None
    if not isinstance(bias, Mapping):
        raise _bad("logit_bias", "must be an object mapping token ids to numbers")
    if len(bias) > MAX_LOGIT_BIAS:
        raise _bad("logit_bias", f"has more than {MAX_LOGIT_BIAS} entries")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {k!r} is not a token id") from None
        if isinstance(k, bool) or tok < 0 or str(tok) != str(k).strip():
            raise _bad("logit_bias", f"key {k!r} is not a token id")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or not -100 <= v <= 100:
            raise _bad("logit_bias", "values must be numbers in [-100, 100]")
        out[tok] = float(v)
    return out


__all__ = ["SamplingParams", "SamplingKwargs", "LIMITS", "INT_LIMITS", "MAX_BEAMS", "MAX_N", "MAX_STOPS", "MAX_TOP_LOGPROBS"]
