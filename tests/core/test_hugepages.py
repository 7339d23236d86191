"""Huge pages for the weights llama.cpp holds in its own memory (localllm/runtime/_hugepages.py),
and reading the weights into memory instead of mapping the file (``mmap``, hardware.weights_in_memory).

The kernel is the reference: /proc/self/smaps says which mappings carry
MADV_HUGEPAGE (``hg`` in VmFlags) and how much of them is backed by huge pages,
/proc/self/maps whether the file is mapped, and llama.cpp's own log says how
large its weight buffers are."""

from __future__ import annotations

import random
import re

import pytest

from localllm.runtime import _hugepages as hp


def _pages(ranges: list[tuple[int, int]]) -> set[int]:
    return {p for a, b in ranges for p in range(a, b, 4096)}


def test_new_ranges_are_exactly_the_pages_that_appeared() -> None:
    """Against a page-by-page set difference, on random mappings that grow, shrink, merge and split."""
    rng = random.Random(7)
    for _ in range(300):
        def mappings() -> list[tuple[int, int]]:
            cuts = sorted(rng.sample(range(0, 200), rng.randrange(0, 12) * 2))
            return [(a * 4096, b * 4096) for a, b in zip(cuts[::2], cuts[1::2])]

        before, after = mappings(), mappings()
        got = hp.new_ranges(before, after)
        assert _pages(got) == _pages(after) - _pages(before)
        assert all(a < b for a, b in got), got  # no empty ranges


def test_anonymous_ranges_keep_the_heap_and_skip_files_stack_and_read_only() -> None:
    maps = "\n".join([
        "7f0000000000-7f0000400000 rw-p 00000000 00:00 0 ",            # anonymous: kept
        "7f0000400000-7f0000600000 r--p 00000000 00:00 0 ",            # read-only
        "7f0000600000-7f0000800000 rw-p 00000000 fe:00 5432944    /m.gguf",  # a file
        "7f0000800000-7f0000a00000 rw-s 00000000 00:00 0 ",            # shared
        "55d000000000-55d000100000 rw-p 00000000 00:00 0          [heap]",          # malloc grows it: kept
        "7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0          [stack]",
        "7f0000a00000-7f0000c00000 rw-p 00000000 00:00 0",             # anonymous: kept
    ])
    assert hp.anonymous_ranges(maps) == [(0x55D000000000, 0x55D000100000), (0x7F0000000000, 0x7F0000400000),
                                         (0x7F0000A00000, 0x7F0000C00000)]


def _hg_huge_kib() -> dict[int, int]:
    """AnonHugePages (KiB) of every mapping marked MADV_HUGEPAGE, by start address."""
    out = {}
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read()):
        flags = re.search(r"VmFlags:(.*)", block)
        if flags and " hg" in flags.group(1):
            out[int(block.split("-", 1)[0], 16)] = int(re.search(r"AnonHugePages:\s+(\d+)", block).group(1))
    return out


def _buffer_mib(lines: list[str], kind: str) -> list[float]:
    """llama.cpp's logged sizes of its ``kind`` model buffers (CPU_REPACK, CPU, CPU_Mapped)."""
    return [float(m.group(1)) for line in lines
            if (m := re.search(rf"\b{kind} model buffer size =\s*([\d.]+) MiB", line))]


def _repack_mib(lines: list[str]) -> float:
    """The buffers llama.cpp fills itself with repacked weights: CPU_REPACK, or AMX's on a build with AMX."""
    sizes = _buffer_mib(lines, "CPU_REPACK") + _buffer_mib(lines, "AMX")
    assert sizes, "llama.cpp did not repack this model's weights: pick a model it repacks"
    return sum(sizes)


_LOAD = """
import json, sys
from localllm import store, resolve
from localllm.runtime import LlamaModel
from localllm.runtime._lib import _backend
sys.path.insert(0, sys.argv[1])
from test_hugepages import _hg_huge_kib, _repack_mib
sink = _backend()
before, mark = _hg_huge_kib(), sink.mark()
m = LlamaModel(resolve.resolve("smollm2-135m:q4_0"))  # Q4_0 is repacked on x86 and ARM
gained = (sum(_hg_huge_kib().values()) - sum(before.values())) / 1024
print(json.dumps({"repack": _repack_mib(sink.since(mark)), "gained": gained, "marked": m.hugepage_bytes}))
"""


@pytest.mark.skipif(hp.thp_mode() != "madvise", reason="needs a kernel whose THP mode is madvise "
                    f"(this one: {hp.thp_mode()})")
@pytest.mark.parametrize("on", [True, False])
def test_repacked_weights_sit_in_huge_pages(on: bool) -> None:
    """In a fresh process (one that loaded and freed models before may serve the buffer from
    memory malloc already holds, which keeps its small pages: runtime/_hugepages.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    # LOCALLLM_AMX=1: on a build with AMX the repacked weights go to AMX's buffers, which are off by default
    # because their matmul crashes on prompt batches; this process only loads, it never decodes
    run = subprocess.run([sys.executable, "-c", _LOAD, str(Path(__file__).parent)], capture_output=True, text=True,
                         env={**os.environ, "LOCALLLM_HUGEPAGES": "1" if on else "0", "LOCALLLM_AMX": "1"},
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    if on:
        # every whole 2 MiB page of the buffer: all but at most the two partial ones at its ends
        assert r["gained"] >= r["repack"] - 4, r
        assert r["marked"] >= (r["repack"] - 4) * 2**20, r
    else:
        assert r["gained"] == 0 and r["marked"] == 0, r


_LOAD_MODEL = """
import json, sys
from localllm import Model, store, resolve
from localllm.runtime._lib import _backend
sys.path.insert(0, sys.argv[1])
from test_hugepages import _buffer_mib, _hg_huge_kib
sink = _backend()
path = str(resolve.resolve("smollm2-135m:q8_0"))  # not repacked: every weight is in the CPU buffer
before, mark = _hg_huge_kib(), sink.mark()
m = Model(path, n_ctx=256, prompt_cache=False, mmap=json.loads(sys.argv[2]))
gained = (sum(_hg_huge_kib().values()) - sum(before.values())) / 1024
mapped = any(line.rstrip().endswith(path) for line in open("/proc/self/maps"))
log = sink.since(mark)
print(json.dumps({"info_mmap": m.info.mmap, "mapped": mapped, "gained": gained, "cpu": _buffer_mib(log, "CPU"),
                  "cpu_mapped": _buffer_mib(log, "CPU_Mapped"), "text": m.complete("1, 2, 3,", max_tokens=8,
                  temperature=0).text}))
"""


@pytest.mark.skipif(hp.thp_mode() != "madvise", reason="needs a kernel whose THP mode is madvise "
                    f"(this one: {hp.thp_mode()})")
@pytest.mark.parametrize("env,mmap", [("1", None), ("1", True), ("0", None), ("0", False)])
def test_weights_are_read_into_huge_pages_unless_mapped(env: str, mmap: bool | None) -> None:
    """Auto reads the weights into memory where huge pages back them (all of the CPU buffer but its
    partial 2 MiB ends); ``mmap=True`` and ``LOCALLLM_HUGEPAGES=0`` map the file; ``mmap=False`` reads
    even then, into small pages. Each in a fresh process, answering the same greedy text."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", _LOAD_MODEL, str(Path(__file__).parent), json.dumps(mmap)],
                         capture_output=True, text=True, env={**os.environ, "LOCALLLM_HUGEPAGES": env}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    read = mmap is False or (mmap is None and env == "1")
    assert r["info_mmap"] is not read and r["mapped"] is not read, r
    if read:
        assert r["cpu"] and not r["cpu_mapped"], r  # llama.cpp's own log: a CPU buffer, no mapped one
    else:
        assert r["cpu_mapped"] and not r["cpu"], r
    if read and env == "1":
        assert r["gained"] >= sum(r["cpu"]) - 4, r
    elif env == "1":  # mapped: the weights stay in the file's pages; a few MiB of the load's own
        assert r["gained"] <= 8 < sum(r["cpu_mapped"]) / 4, r  # allocations may be collapsed (finish)
    else:
        assert r["gained"] == 0, r
    assert r["text"].startswith(" 4, 5, 6"), r  # the weights work: the model counts on


@pytest.mark.parametrize("env", ["1", "0"])
def test_doctor_reports_the_kernels_mode_and_whether_loading_asks(env: str, tmp_path) -> None:
    import json
    import sys
    from pathlib import Path

    from tests.helpers import cli  # here: the child processes above import this file alone, from its folder

    f = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = re.search(r"\[(\w+)\]", f.read_text()).group(1) if f.exists() else None
    run = cli("doctor", "--json", env={"LOCALLLM_HUGEPAGES": env})
    hp = json.loads(run.stdout)["huge_pages"]
    linux = sys.platform == "linux"
    assert hp == {"thp_mode": mode, "asked": mode == "madvise" and env == "1" and linux,
                  "weights_in_memory": mode in ("madvise", "always") and env == "1" and linux}
    text = cli("doctor", env={"LOCALLLM_HUGEPAGES": env}).stdout
    line = next(line for line in text.splitlines() if line.startswith("  THP "))
    assert (mode or "no transparent") in line and ("read into" in line) == hp["weights_in_memory"], line


@pytest.mark.skipif(hp.thp_mode() != "madvise", reason="needs a kernel whose THP mode is madvise "
                    f"(this one: {hp.thp_mode()})")
def test_old_memory_filled_during_a_load_is_collapsed_into_huge_pages() -> None:
    """What :meth:`NewMemory.finish` does for a buffer malloc carved from memory it held: 16 MiB of
    existing anonymous memory, one page per 2 MiB present, then filled. The kernel says how much of
    it is then backed by huge pages (smaps), and /proc/self/pagemap is read by a second route."""
    import ctypes
    import mmap

    size = 16 << 20
    m = mmap.mmap(-1, size + (2 << 20), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # in small pages
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    start = -(-base // (2 << 20)) * (2 << 20)
    for off in range(start - base, start - base + size, 2 << 20):
        m[off] = 1  # one page of each chunk present: "old" memory, as malloc_trim leaves it
    ranges = [(start, start + size)]
    before = hp.chunk_presence(ranges)
    assert sorted(before.items()) == [(start + i * (2 << 20), 1) for i in range(8)]
    m[start - base:start - base + size] = b"\x07" * size  # llama.cpp fills the buffer
    after = hp.chunk_presence(ranges)
    assert set(after.values()) == {512}
    runs = hp.filled_runs(before, after)
    assert runs == ranges
    assert hp.collapse(runs) == size
    block = next(b for b in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", open("/proc/self/smaps").read())
                 if int(b.split("-", 1)[0], 16) <= start < int(b.split("-", 1)[1].split()[0], 16))
    assert int(re.search(r"AnonHugePages:\s+(\d+)", block).group(1)) >= size // 1024, block
    assert m[start - base:start - base + size] == b"\x07" * size  # the copy kept every byte
    del block
    m.close()


def test_filled_runs_joins_neighbours_and_skips_what_was_full_or_is_not() -> None:
    c = 2 << 20
    before = {0: 0, c: 3, 2 * c: 512, 3 * c: 0, 5 * c: 100, 6 * c: 0}
    after = {0: 512, c: 512, 2 * c: 512, 3 * c: 511, 5 * c: 512, 6 * c: 512, 7 * c: 512}
    assert hp.filled_runs(before, after) == [(0, 2 * c), (5 * c, 7 * c)]


_RELOAD = """
import json, os, sys
from localllm import Model, store, resolve
from localllm.runtime._lib import _backend
sys.path.insert(0, sys.argv[1])
from test_hugepages import _buffer_mib, _hg_huge_kib
sink = _backend()
for ref in ("smollm2-135m:q8_0", "smollm2-135m:bf16"):  # what hugepages_bench did in one process
    models = []
    for mmap, env in ((False, "1"), (False, "0"), (True, "1")):
        os.environ["LOCALLLM_HUGEPAGES"] = env
        models.append(Model(resolve.resolve(ref), n_ctx=1024, prompt_cache=False, mmap=mmap))
    for m in models:
        m.complete("1, 2, 3,", max_tokens=8, temperature=0)
    for m in models:
        m.close()
os.environ["LOCALLLM_HUGEPAGES"] = "1"
mark = sink.mark()
m = Model(resolve.resolve("smollm2-135m:q4_0"), n_ctx=1024, prompt_cache=False, mmap=False)
log = sink.since(mark)
print(json.dumps({"buffers": _buffer_mib(log, "CPU") + _buffer_mib(log, "CPU_REPACK"),
                  "marked": m.engine.llama.hugepage_bytes / 2**20, "huge": sum(_hg_huge_kib().values()) / 1024}))
"""


@pytest.mark.skipif(hp.thp_mode() != "madvise", reason="needs a kernel whose THP mode is madvise "
                    f"(this one: {hp.thp_mode()})")
def test_a_model_loaded_after_others_still_gets_huge_pages() -> None:
    """Six loads and frees before it, Q4_0's 29 MiB CPU buffer comes from memory malloc holds (on this
    glibc); without the collapse after the load only its 57 MiB repacked buffer was in huge pages."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", _RELOAD, str(Path(__file__).parent)], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    r = json.loads(run.stdout.strip().splitlines()[-1])
    from localllm import runtime

    # the CPU buffer, and the repacked one where extra buffers are used (not with AMX compiled in: runtime._lib)
    assert len(r["buffers"]) == 1 + runtime.extra_buffers_usable() and r["marked"] >= sum(r["buffers"]) - 8, r
    assert r["huge"] >= sum(r["buffers"]) - 8, r  # the kernel's count, not ours (smaps: 56 MiB without it)
