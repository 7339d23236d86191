"""Turning a stream of token bytes into text, with stop strings.

Tokens may end in the middle of a UTF-8 character, and a stop string may
span several tokens, so text is released only once it can no longer become
part of a stop string.

Example:
    >>> s = TextStream(["\\n\\n"])
    >>> s.feed(b"Hello\\n"), s.feed(b"\\nWorld"), s.stopped
    ('Hello', '', True)
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._pending = ""
        self.text = ""  # everything released so far
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    @property
    def position(self) -> int:
        """Characters decoded so far (released or held back)."""
        return len(self.text) + len(self._pending)

    def feed(self, data: bytes) -> str:
        """Add token bytes; return the newly released text ('' if held back)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        if not self._stop:
            out, self._pending = self._pending, ""
            self.text += out
            return out
        # earliest stop-string occurrence wins
        hits = [(i, s) for s in self._stop if (i := self._pending.find(s)) >= 0]
        cut = min(hits)[0] if hits else -1
        if cut >= 0:
            self.matched = min(hits)[1]
            out = self._pending[:cut]
            self._pending = ""
            self.stopped = True
        else:
            keep = min(self._hold, len(self._pending))
            # hold back only a tail that is a prefix of some stop string
            while keep > 0 and not any(s.startswith(self._pending[-keep:]) for s in self._stop):
                keep -= 1
            if keep >= len(self._pending):
                return ""
            out = self._pending[:len(self._pending) - keep] if keep else self._pending
            self._pending = self._pending[len(out):]
        self.text += out
        return out

    def flush(self) -> str:
        """Release what is left at the end of generation."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        self.text += out
        return out
