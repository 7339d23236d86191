"""Converter I/O: kills and full disks leave nothing at OUT (and no temp files),
a tensor that disagrees with config.json names its file, ``--name`` adds to the
store, and hub repo ids resolve through the HF cache (offline, no network)."""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import types
from functools import partial
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from localllm.converter import convert  # noqa: E402
from localllm.errors import DiskFullError  # noqa: E402
from tests.convert_fixtures import build_checkpoint  # noqa: E402
from tests.helpers import ROOT, cli  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint("qwen2", tmp_path_factory.mktemp("io") / "hf")


_cli = partial(cli, timeout=300)  # a conversion


# ---------------------------------------------------------------- kill / Ctrl-C

_CHILD = """
import signal, sys, time
# Python ignores SIGINT when its parent did (background jobs): act like a terminal
signal.signal(signal.SIGINT, signal.default_int_handler)
from localllm import runtime
from localllm.converter import convert, tensors, writer
src, out, quant, where, named = sys.argv[1:6]
if named == "1":
    writer._anonymous_fd = lambda d: None   # the named-temp-file fallback (non-Linux)

def pause():
    print("MID", flush=True)
    time.sleep(120)

if where == "write":
    orig = tensors.OutTensor.compute
    n = [0]
    def compute(self):
        n[0] += 1
        if n[0] == 4:
            pause()
        return orig(self)
    tensors.OutTensor.compute = compute
else:
    orig_q = runtime.quantize
    def quantize(*a, **k):
        pause()
        return orig_q(*a, **k)
    runtime.quantize = quantize
convert(src, out, quant=quant)
"""


def _run_and_kill(src: Path, out: Path, quant: str, where: str, sig: int, named: bool = False) -> int:
    p = subprocess.Popen([sys.executable, "-c", _CHILD, str(src), str(out), quant, where, "1" if named else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        ready, _, _ = select.select([p.stdout], [], [], 120)
        assert ready and p.stdout.readline().strip() == "MID", p.stderr.read() if p.poll() is not None else ""  # type: ignore[union-attr]
        p.send_signal(sig)
        return p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@pytest.mark.parametrize("quant, where, sig", [
    ("F32", "write", signal.SIGINT),      # Ctrl-C while tensors stream out
    ("F32", "write", signal.SIGKILL),     # kill -9: no Python cleanup runs at all
    ("Q4_K_M", "write", signal.SIGTERM),  # while writing the intermediate
    ("Q4_K_M", "quantize", signal.SIGKILL),  # intermediate complete, before llama.cpp quantizes
])
def test_killed_conversion_leaves_nothing(tiny: Path, tmp_path: Path, quant: str, where: str, sig: int) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    rc = _run_and_kill(tiny, out_dir / "m.gguf", quant, where, sig)
    assert rc != 0
    assert list(out_dir.iterdir()) == []  # no OUT, no partial, no intermediate


def test_killed_named_fallback_is_cleaned_by_next_run(tiny: Path, tmp_path: Path) -> None:
    """Without O_TMPFILE a SIGKILL leaves `.OUT.<pid>.partial`; the next run removes it."""
    out = tmp_path / "m.gguf"
    _run_and_kill(tiny, out, "F32", "write", signal.SIGKILL, named=True)
    assert not out.exists()
    assert [p.name.endswith(".partial") for p in tmp_path.iterdir()] == [True]
    convert(tiny, out, quant="F32")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_link_refused_falls_back_to_copy(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A filesystem that refuses to link the unnamed file still gets OUT (copied)."""
    def refuse(*a, **k) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", refuse)
    res = convert(tiny, tmp_path / "m.gguf", quant="Q8_0")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and res.size_bytes == (tmp_path / "m.gguf").stat().st_size


# ---------------------------------------------------------------- full disk

class _FillingFile:
    """A real file that, after ``room`` bytes, writes to /dev/full: the kernel
    itself then fails the write with ENOSPC, exactly as a full disk does."""

    def __init__(self, path: str, mode: str, room: int) -> None:
        self._f = open(path, mode)  # noqa: SIM115
        self._room = room

    def write(self, b) -> int:
        n = memoryview(b).nbytes
        if n > self._room and self._f.name != "/dev/full":
            self._f.close()
            self._f = open("/dev/full", "wb")  # noqa: SIM115
        self._room -= n
        return self._f.write(b)

    def __getattr__(self, name: str):
        return getattr(self._f, name)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("quant", ["F32", "Q4_K_M"])
def test_full_disk_mid_write(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quant: str) -> None:
    """The disk fills while tensors are written: a clear DiskFullError, nothing at OUT."""
    import gguf.gguf_writer

    monkeypatch.setattr(gguf.gguf_writer, "open", lambda p, mode="r": _FillingFile(p, mode, 200_000),
                        raising=False)
    with pytest.raises(DiskFullError, match="the disk is full; nothing was written to") as e:
        convert(tiny, tmp_path / "m.gguf", quant=quant)
    assert e.value.hint and "free some space" in e.value.hint  # type: ignore[attr-defined]
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_llama_cpp_quantizes(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp's failed write has no cause attached; a nearly full disk supplies it."""
    from localllm import runtime
    from localllm.converter import writer
    from localllm.errors import ModelLoadError

    def fail(src, dst, *a, **k) -> None:
        Path(dst).write_bytes(b"GGUF partial")
        monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=1, used=1, free=0))
        raise ModelLoadError("quantizing failed: write error")
    monkeypatch.setattr(runtime, "quantize", fail)
    with pytest.raises(DiskFullError, match="the disk is full"):
        convert(tiny, tmp_path / "m.gguf", quant="Q4_K_M")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_found_before_writing(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm.converter import writer

    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: types.SimpleNamespace(total=10**9, used=10**9, free=1000))
    with pytest.raises(DiskFullError, match="needs about .* GB but only 0.00 GB is free"):
        convert(tiny, tmp_path / "m.gguf", quant="F16")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", ["tiny rows", "whole K blocks", "whole K blocks, tied embedding"])
def test_space_check_counts_the_quantized_output_not_a_second_intermediate(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: str) -> None:
    """A quant llama.cpp makes needs the intermediate plus the (smaller) output, not twice the
    intermediate: a 7B's Q4_K_M about 19.6 GB, not 29. The check must still cover what is written:
    with rows llama.cpp cannot quantize as asked (64 wide), with whole 256-blocks, and with a tied
    embedding that llama.cpp raises to Q6_K as the output (most of a small model)."""
    import gguf

    from localllm import runtime
    from localllm.converter import pipeline

    needs: list[int] = []
    mids: list[int] = []
    real_check, real_quantize = pipeline.check_space, runtime.quantize
    monkeypatch.setattr(pipeline, "check_space", lambda path, need: (needs.append(need), real_check(path, need))[1])

    def quantize(src, dst, *a, **k):
        mids.append(sum(int(t.n_bytes) for t in gguf.GGUFReader(src).tensors))
        return real_quantize(src, dst, *a, **k)
    monkeypatch.setattr(runtime, "quantize", quantize)
    src = tiny
    if shape != "tiny rows":
        # tied: SmolLM2's 49,152-token vocabulary makes the embedding 95 % of the model, as in small real ones
        src = build_checkpoint("llama" if "tied" in shape else "qwen2", tmp_path / "hf",
                               config={"hidden_size": 256, "intermediate_size": 512,
                                       "tie_word_embeddings": "tied" in shape})
    convert(src, tmp_path / "m.gguf", quant="Q4_K_M")
    written = sum(int(t.n_bytes) for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors)
    assert len(needs) == 1 and len(mids) == 1
    assert mids[0] + written <= needs[0] < 2 * mids[0], (mids[0], written, needs[0])


# ---------------------------------------------------------------- wrong sizes

def test_tensor_size_disagreeing_with_config_names_file(tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 96  # the weights are 128 wide
    (bad / "config.json").write_text(json.dumps(cfg))
    r = _cli("convert", str(bad), "-o", str(tmp_path / "m.gguf"), "--quant", "F32", "-q")
    assert r.returncode != 0
    assert f"{bad / 'model.safetensors'}: tensor 'model.layers.0.mlp" in r.stderr, r.stderr
    assert "config.json implies" in r.stderr and "intermediate_size 96" in r.stderr
    assert not (tmp_path / "m.gguf").exists()


def test_vocabulary_written_once(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe runs on the written file and its result is patched in: one vocab write."""
    from localllm import validate
    from localllm.converter import pipeline

    calls = []
    orig = pipeline.write_vocab
    monkeypatch.setattr(pipeline, "write_vocab", lambda *a, **k: (calls.append(1), orig(*a, **k))[1])
    res = convert(tiny, tmp_path / "m.gguf", quant="F16")
    assert len(calls) == 1
    meta = validate.read_header(res.path).metadata
    assert meta["localllm.tokenizer_probe.cases"] == res.probe.cases > 0
    assert meta["localllm.tokenizer_probe.llama_cpp_mismatches"] == res.probe.llama_cpp_mismatches


# ---------------------------------------------------------------- --name, hub

def test_name_adds_to_store(tiny: Path, tmp_path: Path) -> None:
    from localllm import store, validate, resolve

    home = tmp_path / "home"
    r = _cli("convert", str(tiny), "--name", "tinyconv", "--quant", "Q8_0", "-q", env={"LOCALLLM_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    path = resolve.resolve("tinyconv:q8_0", models_dir=home / "models")
    manifest = json.loads((path.parent / store.MANIFEST).read_text())
    assert manifest["source"]["converted_from"] == str(tiny)
    assert manifest["arch"] == "qwen2" and f"wrote {path}" in r.stdout
    assert validate.read_header(path).metadata["localllm.tokenizer_probe.cases"] > 0
    assert not [p for p in (home / "models").iterdir() if p.name.startswith(".tmp")]


def _fake_hub_cache(hub: Path, repo: str, files: Path) -> Path:
    """The layout huggingface_hub itself writes: refs/main → snapshots/<commit>/."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    d = hub / f"models--{repo.replace('/', '--')}"
    snap = d / "snapshots" / commit
    shutil.copytree(files, snap)
    (d / "refs").mkdir()
    (d / "refs" / "main").write_text(commit)
    return snap


def test_hub_repo_id_from_offline_cache(tiny: Path, tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "acme/tiny", tiny)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub), "HF_HOME": str(tmp_path / "hfhome")}
    r = _cli("convert", "acme/tiny", "-o", str(tmp_path / "m.gguf"), "--quant", "F32", "-q", env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.gguf").exists()
    r = _cli("convert", "acme/absent", "-o", str(tmp_path / "n.gguf"), "--quant", "F32", "-q", env=env)
    assert r.returncode != 0 and "acme/absent: cannot download from the Hugging Face hub" in r.stderr
    assert not (tmp_path / "n.gguf").exists()


def test_hub_download_patterns(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only config, tokenizer and weights are fetched; .bin only when there are no safetensors."""
    import huggingface_hub

    from localllm.converter.checkpoint import resolve_source

    calls: list[dict] = []
    folder = {"path": tiny}

    def fake(repo_id: str, *, revision: str | None = None, allow_patterns: list[str] | None = None) -> str:
        calls.append({"repo": repo_id, "revision": revision, "patterns": allow_patterns})
        return str(folder["path"])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    assert resolve_source("acme/tiny", "v1") == tiny
    (c,) = calls
    assert c["repo"] == "acme/tiny" and c["revision"] == "v1"
    assert {"config.json", "tokenizer*", "*.safetensors", "*.safetensors.index.json"} <= set(c["patterns"])
    assert not any(".bin" in p or "gguf" in p or p == "*" for p in c["patterns"])

    calls.clear()
    folder["path"] = tmp_path / "binonly"
    folder["path"].mkdir()
    resolve_source("acme/old")
    assert len(calls) == 2 and "pytorch_model*.bin" in calls[1]["patterns"]


def test_one_quant_table_matches_llama_cpp_and_the_cli() -> None:
    """formats.QUANTS' file types are gguf's LlamaFileType (an independent copy of llama.h), and `convert --quant`
    offers exactly the quants marked for it, plus auto."""
    import gguf

    from localllm.cli.convert import command
    from localllm.formats import CONVERT_QUANTS, QUANTS

    for name, q in QUANTS.items():
        assert gguf.LlamaFileType(q.ftype).name.removeprefix("MOSTLY_").removeprefix("ALL_") == name
    choices = next(p for p in command.params if p.name == "quant").type.choices
    assert list(choices) == [*CONVERT_QUANTS, "auto"]
