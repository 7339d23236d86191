"""Transparent huge pages for the weights llama.cpp holds in its own memory.

llama.cpp keeps weights in memory it allocates itself in two cases: when it
reads the file instead of mapping it (``mmap=False``, the default where THP is
available: ``hardware.weights_in_memory``), and, on x86, for the Q4_0, IQ4_NL
and k-quant matrices it repacks into an interleaved layout (``CPU_REPACK model
buffer``). On a kernel whose THP mode is ``madvise`` (Debian's default) that
memory gets 4 KiB pages, and a decode, which streams every weight once per
token, then misses the TLB on every page. Backed by 2 MiB pages, decode was
3-16 % faster with the weights read into memory, and about 3 % faster for
repacked Q4_0 with the rest mapped, on an AVX-512 EPYC
(``benchmarks/hugepages_bench.py``). llama.cpp does not ask for huge pages, and
glibc only does with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` set before the
process starts, which a library cannot do.

So the loader marks, with ``madvise(MADV_HUGEPAGE)``, the anonymous memory
that appeared while llama.cpp allocated the model's buffers, *before* it fills
them: its first progress callback comes after the allocation and before the
first tensor is read. The pages then fault in as huge pages; nothing is copied.
A mapped file's pages are untouched (the page cache cannot be asked for huge
pages on this kernel configuration), and so is the KV cache (huge pages there
measured +1 %, within the noise).

malloc may serve a buffer from free memory it already holds (in a process that
has loaded and freed models before: glibc does so for buffers under 32 MiB,
its largest mmap threshold); that one is not new and keeps its 4 KiB pages.
So the loader first hands malloc's free memory back (``malloc_trim``), counts
the growth of malloc's ``[heap]`` as new, and, once the load is done, has the
kernel copy into huge pages (``MADV_COLLAPSE``, Linux 6.1) each 2 MiB of old
memory that was empty before the load and is full after it.

Off with ``LOCALLLM_HUGEPAGES=0``; a no-op where the kernel has no THP, where
its mode is ``never`` (the administrator's choice) or ``always`` (nothing to
ask), and on other systems than Linux.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

from localllm.hardware import thp_mode

_MADV_HUGEPAGE = 14  # <sys/mman.h>
_MADV_COLLAPSE = 25  # Linux 6.1
_PAGE = 4096
_HUGE = 2 << 20

Ranges = list[tuple[int, int]]


def wanted() -> bool:
    """Whether loading should ask for huge pages: Linux, THP in ``madvise`` mode, not turned off."""
    from localllm import settings

    return sys.platform == "linux" and settings.hugepages() and thp_mode() == "madvise"


def anonymous_ranges(maps: str | None = None) -> Ranges:
    """The process's private anonymous writable mappings, as sorted ``(start, end)``."""
    if maps is None:
        maps = Path("/proc/self/maps").read_text()
    out = []
    for line in maps.splitlines():
        f = line.split()
        # an anonymous mapping has no path (a 6th field), except malloc's [heap], which grows in place
        # (a buffer malloc takes from it is its new end); [stack] and files are left alone
        anonymous = len(f) == 5 or (len(f) == 6 and f[5] == "[heap]")
        if anonymous and f[1].startswith("rw") and f[1].endswith("p") and f[4] == "0":
            a, b = (int(x, 16) for x in f[0].split("-"))
            out.append((a, b))
    return sorted(out)


def new_ranges(before: Ranges, after: Ranges) -> Ranges:
    """Address ranges in ``after`` not covered by ``before`` (the kernel merges a new mapping
    with a neighbouring one, so whole mappings cannot be compared)."""
    out: Ranges = []
    j = 0
    for a, b in after:
        cur = a
        while j < len(before) and before[j][1] <= cur:
            j += 1
        k = j
        while cur < b and k < len(before) and before[k][0] < b:
            s, e = before[k]
            if s > cur:
                out.append((cur, s))
            cur = max(cur, e)
            k += 1
        if cur < b:
            out.append((cur, b))
    return out


def _madvise():
    """libc's ``madvise(addr, length, advice)``."""
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def advise(ranges: Ranges) -> int:
    """Mark each range's whole 2 MiB pages ``MADV_HUGEPAGE``, so that the pages touched from now
    on are huge. Returns the bytes marked."""
    madvise = _madvise()
    marked = 0
    for a, b in ranges:
        lo, hi = -(-a // _HUGE) * _HUGE, b // _HUGE * _HUGE
        if hi > lo and madvise(lo, hi - lo, _MADV_HUGEPAGE) == 0:
            marked += hi - lo
    return marked


def chunk_presence(ranges: Ranges) -> dict[int, int]:
    """Present 4 KiB pages in each whole 2 MiB chunk of ``ranges``, by chunk address (/proc/self/pagemap:
    bit 63 of each page's entry; readable without privileges)."""
    import numpy as np

    out: dict[int, int] = {}
    with open("/proc/self/pagemap", "rb") as f:
        for a, b in ranges:
            lo, hi = -(-a // _HUGE) * _HUGE, b // _HUGE * _HUGE
            if hi <= lo:
                continue
            f.seek(lo // _PAGE * 8)
            raw = f.read((hi - lo) // _PAGE * 8)
            n = len(raw) // 8 // (_HUGE // _PAGE)  # whole chunks read
            counts = (np.frombuffer(raw[:n * _HUGE // _PAGE * 8], dtype="<u8") >> np.uint64(63)).reshape(n, -1).sum(1)
            out.update(zip(range(lo, lo + n * _HUGE, _HUGE), counts.tolist()))
    return out


def filled_runs(before: dict[int, int], after: dict[int, int]) -> Ranges:
    """The runs of 2 MiB chunks that were not wholly present before and are after."""
    full = _HUGE // _PAGE
    chunks = sorted(c for c, n in after.items() if n == full and c in before and before[c] < full)
    runs: Ranges = []
    for c in chunks:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + _HUGE)
        else:
            runs.append((c, c + _HUGE))
    return runs


def collapse(runs: Ranges) -> int:
    """Mark ``runs`` ``MADV_HUGEPAGE`` and have the kernel copy them into huge pages now
    (``MADV_COLLAPSE``). Returns the bytes collapsed; 0 on kernels without it."""
    madvise = _madvise()
    done = 0
    for a, b in runs:
        if madvise(a, b - a, _MADV_HUGEPAGE) == 0 and madvise(a, b - a, _MADV_COLLAPSE) == 0:
            done += b - a
    return done


def _trim() -> None:
    """Give the free memory at the top of malloc's heaps back to the system (glibc's malloc_trim):
    a long-running process holds up to 64 MiB there, and a buffer carved from it is not new."""
    try:
        libc = ctypes.CDLL(None)
        if hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


class NewMemory:
    """The anonymous memory allocated between :meth:`start` and :meth:`mark`: a model load
    calls :meth:`mark` from its first progress callback, when llama.cpp's buffers exist but
    are still empty, so that they fault in as huge pages; and :meth:`finish` once it is done,
    for buffers malloc carved from memory it already held."""

    def __init__(self) -> None:
        self.old: Ranges | None = None  # the anonymous mappings before the load; None: not wanted
        self.pending = False            # mark() still to come
        self.presence: dict[int, int] = {}
        self.marked = 0

    def start(self) -> None:
        if not wanted():
            self.old, self.pending = None, False
            return
        _trim()  # else malloc may serve the buffers from free memory it already holds (not new)
        self.old, self.pending = anonymous_ranges(), True
        try:
            self.presence = chunk_presence(self.old)
        except (OSError, ValueError):
            self.presence = {}

    def mark(self) -> None:
        if not self.pending or self.old is None:
            return
        self.pending = False  # once
        try:
            self.marked = advise(new_ranges(self.old, anonymous_ranges()))
        except OSError:  # no /proc or no libc: a speed-up missed, never a failed load
            self.marked = 0

    def finish(self) -> None:
        """After the load: collapse the old memory the buffers were carved from into huge pages."""
        presence, self.presence = self.presence, {}
        if not presence:
            return
        try:
            self.marked += collapse(filled_runs(presence, chunk_presence(self.old or [])))
        except (OSError, ValueError):
            pass
