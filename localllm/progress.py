"""The progress callback every long library call takes (the CLI renders it with tqdm; the library never prints).

Example:
    >>> def show(done: int, total: int, what: str) -> None: ...
    >>> callback: Progress = show
"""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]   # (done, total, what)

__all__ = ["Progress"]
