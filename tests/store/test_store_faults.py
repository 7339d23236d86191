"""The store's doors as real processes: ``models import`` and ``models pull``
killed with SIGKILL at seeded random moments, a full disk (RLIMIT_FSIZE), and
two processes writing the same entry. Each case is a row of docs/RELIABILITY.md
(``LOCALLLM_REGEN=1`` rewrites the table).

Pulls cannot reach the network here: the runner points the Hugging Face cache
at a local one and replaces only ``hf_hub_download`` (as huggingface_hub
answers from its cache), and refuses hard links so that the file is copied,
as across filesystems.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from localllm import store
from tests.helpers import ROOT
from tests.reliability_doc import Cases

KILLS = 6
CASES = Cases("store-faults", "tests/test_store_faults.py", "Files: kills, full disks, two writers", (
    "Each door runs as its own process on the default model (a ~140 MB GGUF); after each fault the store must be "
    "*consistent*: every version directory has a manifest, `store.verify` passes on every entry (size and "
    "sha256 agree with the file), and a leftover temporary directory is swept by the next write. "
    "`convert` has its own kill and full-disk cases in `tests/test_convert_io.py`."), {
    "import-kill": (f"`models import` killed with SIGKILL at {KILLS} seeded random moments of its run",
                    "consistent: no entry or a whole one, never a partial file; the next import succeeds, "
                    "no `.tmp-*` left"),
    "pull-kill": (f"`models pull` (copying from the HF cache) killed at {KILLS} seeded random moments",
                  "the same as import-kill"),
    "import-full": ("`models import` with RLIMIT_FSIZE 8 MiB (writes fail with EFBIG, as on a full disk)",
                    "exit 1, one line `error: STORE: File too large while writing NAME:VERSION (the disk is "
                    "full, or a file-size limit); nothing was added`; no entry, no `.tmp-*`"),
    "pull-full": ("`models pull` with RLIMIT_FSIZE 8 MiB", "the same as import-full"),
    "two-writers": ("two `models import` of *different* files as the same NAME:VERSION, started together "
                    "(both past the duplicate check, then waiting on the store lock)",
                    "one succeeds, the other exits 1 `already in the store` (it used to report success while "
                    "the store held the other file); one consistent entry, holding the winner's file"),
    "two-pulls": ("two `models pull` of the same file at once", "both exit 0; one consistent entry"),
})
covers = CASES.covers


def consistent(root: Path) -> list[str]:
    """The refs in a store that must be consistent (fails otherwise)."""
    for vdir in (p for p in root.glob("*/*") if p.is_dir() and not p.parent.name.startswith(".")):
        assert (vdir / store.MANIFEST).is_file(), f"{vdir} has no manifest"
    report = store.verify(None, root)
    assert all(r["ok"] for r in report), report
    return [e["ref"] for e in store.list_models(root)]


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("LOCALLLM_DEBUG", "HF_HUB_OFFLINE")},
            "PYTHONPATH": str(ROOT)}


_PULL = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    cache, repo, fname = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    os.environ["HF_HUB_OFFLINE"] = "1"
    import huggingface_hub
    def download(repo_id, filename, revision=None, **kw):  # what huggingface_hub answers from its cache
        return str(cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("c" * 40) / filename)
    huggingface_hub.hf_hub_download = download
    def no_link(*a, **k):  # the cache on another filesystem: the file is copied
        raise OSError(18, "Invalid cross-device link")
    os.link = no_link
    from localllm.cli import main
    main(["models", "pull", repo, "--file", fname] + sys.argv[4:])
""")
REPO, FNAME = "someone/Smol-GGUF", "smol.Q8_0.gguf"


@pytest.fixture(scope="module")
def hf_cache(default_model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding the default model (the blob links to it: no copy)."""
    cache = tmp_path_factory.mktemp("hf")
    rdir = cache / ("models--" + REPO.replace("/", "--"))
    (rdir / "blobs").mkdir(parents=True)
    (rdir / "blobs" / "0123abcd").symlink_to(default_model_path)
    snap = rdir / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / FNAME).symlink_to(rdir / "blobs" / "0123abcd")
    return cache


def door(kind: str, root: Path, src: Path, cache: Path | None, name: str = "m", fsize: int | None = None,
         **kw: object) -> subprocess.Popen:
    if kind == "import":
        argv = [sys.executable, "-m", "localllm", "models", "import", str(src), "--name", name, "--version", "v1"]
    else:
        argv = [sys.executable, "-c", _PULL, str(cache), REPO, FNAME, "--name", name, "--version", "v1"]

    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    return subprocess.Popen([*argv, "--models-dir", str(root)], cwd=ROOT, env=_env(), preexec_fn=limit,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _kill_at_random(kind: str, tmp_path: Path, src: Path, cache: Path | None, seed: int) -> None:
    # how long one whole run takes here, now (the machine may be busy)
    t0 = time.monotonic()
    p = door(kind, tmp_path / "whole", src, cache)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    whole = time.monotonic() - t0
    assert consistent(tmp_path / "whole") == ["m:v1"]
    rng = random.Random(seed)
    outcomes = []
    for i in range(KILLS):
        root = tmp_path / f"k{i}"
        at = rng.uniform(0.1, 1.0) * whole
        p = door(kind, root, src, cache)
        time.sleep(at)
        p.kill()
        p.communicate(timeout=60)
        refs = consistent(root) if root.exists() else []
        assert refs in ([], ["m:v1"]), refs
        outcomes.append((round(at, 2), p.returncode, refs))
        if i == KILLS - 1 and root.exists():  # the next write sweeps what the kill left
            store.remove("m:v1", root) if refs else None
            p = door(kind, root, src, cache)
            assert p.wait(timeout=300) == 0, p.stderr.read() if p.stderr else ""
            assert consistent(root) == ["m:v1"]
            assert not list(root.glob(".tmp-*"))
    print(kind, "whole run", round(whole, 2), "s; kills (at s, rc, refs):", outcomes)


@covers("import-kill")
def test_import_killed_at_random(default_model_path: Path, tmp_path: Path) -> None:
    _kill_at_random("import", tmp_path, default_model_path, None, seed=12)


@covers("pull-kill")
def test_pull_killed_at_random(default_model_path: Path, hf_cache: Path, tmp_path: Path) -> None:
    _kill_at_random("pull", tmp_path, default_model_path, hf_cache, seed=13)


@covers("import-full", "pull-full")
@pytest.mark.parametrize("kind", ["import", "pull"])
def test_full_disk(kind: str, default_model_path: Path, hf_cache: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    p = door(kind, root, default_model_path, hf_cache, fsize=8 << 20)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1, (CASES.what(f"{kind}-full"), p.returncode, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {root}: File too large while writing m:v1"), err
    assert "nothing was added" in lines[0]
    assert consistent(root) == []
    assert not list(root.glob(".tmp-*")), list(root.iterdir())


@covers("two-writers")
def test_two_imports_of_different_files_as_one_entry(default_model_path: Path, tiny_gguf: Path,
                                                     tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.mkdir()
    with open(root / ".lock", "a+") as lock:  # hold the store: both get past the duplicate check, then wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = {src: door("import", root, src, None) for src in (default_model_path, tiny_gguf)}
        time.sleep(3)
        assert all(p.poll() is None for p in procs.values())
        fcntl.flock(lock, fcntl.LOCK_UN)
    results = {src: (p.wait(timeout=300), p.stderr.read()) for src, p in procs.items()}
    won = [src for src, (rc, _) in results.items() if rc == 0]
    lost = [(rc, err) for rc, err in results.values() if rc != 0]
    assert len(won) == 1 and len(lost) == 1, (CASES.what("two-writers"), results)
    assert lost[0][0] == 1 and "m:v1 is already in the store" in lost[0][1], lost
    assert consistent(root) == ["m:v1"]
    manifest = json.loads((root / "m" / "v1" / store.MANIFEST).read_text())
    assert manifest["sha256"] == store.sha256_file(won[0]) and manifest["source"] == {"path": str(won[0])}


@covers("two-pulls")
def test_two_pulls_at_once(hf_cache: Path, default_model_path: Path, tmp_path: Path) -> None:
    root = tmp_path / "store"
    procs = [door("pull", root, default_model_path, hf_cache) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], results
    assert consistent(root) == ["m:v1"]
    assert store.verify("m:v1", root)[0]["ok"]
    assert json.loads((root / "m" / "v1" / store.MANIFEST).read_text())["sha256"] == \
        store.sha256_file(default_model_path)


def test_reliability_doc_lists_the_store_cases() -> None:
    CASES.check_doc()
