"""Tables of cases in docs/RELIABILITY.md that the tests check.

A test module declares its cases once (id -> what is done, what must happen),
marks each test with the ids it covers, and one test compares the rendered
table with the document (``LOCALLLM_REGEN=1`` rewrites it). A case without a
test, or a test naming an unknown case, fails that check.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "RELIABILITY.md"
F = TypeVar("F", bound=Callable[..., object])


class Cases:
    def __init__(self, key: str, source: str, heading: str, intro: str, cases: dict[str, tuple[str, str]]) -> None:
        # ``source`` names the test file in the table's markers, as the document has them
        self.key, self.source, self.heading, self.intro, self.cases = key, source, heading, intro, cases
        # the test module that declared the cases, wherever it now sits: for the "regenerate with" hints
        caller = Path(sys._getframe(1).f_globals["__file__"]).resolve()
        self.path = caller.relative_to(DOC.parent.parent).as_posix()
        self.covered: set[str] = set()

    @property
    def begin(self) -> str:
        return f"<!-- {self.key}:begin ({self.source}) -->"

    @property
    def end(self) -> str:
        return f"<!-- {self.key}:end -->"

    def covers(self, *ids: str) -> Callable[[F], F]:
        for i in ids:
            assert i in self.cases, f"unknown case {i!r}"
        self.covered.update(ids)

        def mark(fn: F) -> F:
            return fn
        return mark

    def what(self, case: str) -> str:
        """For assertion messages: the case and the result it promises."""
        return f"{case}: {self.cases[case][1]}"

    def render(self) -> str:
        out = [self.begin, "", self.intro, "", "| case | what the test does | result (asserted) |", "|---|---|---|"]
        for cid, (done, result) in self.cases.items():
            out.append(f"| {cid} | {done.replace('|', chr(92) + '|')} | {result.replace('|', chr(92) + '|')} |")
        out += ["", self.end]
        return "\n".join(out)

    def check_doc(self) -> None:
        missing = set(self.cases) - self.covered
        assert not missing, f"cases in the table that no test covers: {sorted(missing)}"
        table = self.render()
        text = DOC.read_text() if DOC.exists() else "# Reliability\n"
        if os.environ.get("LOCALLLM_REGEN") == "1":
            if self.begin in text and self.end in text:
                text = text[:text.index(self.begin)] + table + text[text.index(self.end) + len(self.end):]
            else:
                text = text.rstrip("\n") + f"\n\n## {self.heading}\n\n" + table + "\n"
            DOC.write_text(text)
        if self.begin not in text or self.end not in text:
            pytest.fail(f"docs/RELIABILITY.md has no {self.key} table: regenerate with "
                        f"LOCALLLM_REGEN=1 pytest {self.path}")
        current = text[text.index(self.begin):text.index(self.end) + len(self.end)]
        if current != table:
            diff = [f"- {a}\n+ {b}" for a, b in zip(current.splitlines(), table.splitlines()) if a != b][:5]
            pytest.fail(f"docs/RELIABILITY.md's {self.key} table differs from {self.path}'s cases; regenerate "
                        f"with LOCALLLM_REGEN=1 pytest {self.path}. First differences:\n" + "\n".join(diff))
