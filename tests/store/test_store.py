"""The model store: manifests, integrity checks, commands, atomic locked imports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from localllm import hub, store, resolve
from localllm.errors import InvalidArgumentError, InvalidModelFileError, ModelIntegrityError, ModelNotFoundError
from tests.helpers import ROOT


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


def cli(*args: str) -> tuple[int, str]:
    from localllm.cli import cli as group, register_commands

    register_commands()
    r = CliRunner().invoke(group, list(args), catch_exceptions=False, standalone_mode=False)
    return (r.return_value if isinstance(r.return_value, int) else r.exit_code), r.output


def test_import_writes_manifest(tiny_gguf: Path, root: Path) -> None:
    e = store.import_file(tiny_gguf, "tiny", root=root)
    assert e["ref"] == "tiny:f32"
    m = json.loads((root / "tiny" / "f32" / "manifest.json").read_text())
    for key in ("sha256", "quick_sha256", "size", "source", "quant", "arch", "parameters", "created",
                "localllm_version"):
        assert m[key] is not None, key
    assert m["size"] == tiny_gguf.stat().st_size
    assert m["sha256"] == store.sha256_file(tiny_gguf)
    assert m["source"] == {"path": str(tiny_gguf.resolve())}
    assert resolve.resolve("tiny", models_dir=root) == root / "tiny" / "f32" / "tiny-f32.gguf"
    assert not list(root.glob(".tmp-*"))


def test_import_move_never_loses_the_file(tmp_path: Path, tiny_gguf: Path, root: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    src = tmp_path / "mine.gguf"
    shutil.copyfile(tiny_gguf, src)

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C while the import hashes the file

    with monkeypatch.context() as m:
        m.setattr(store, "sha256_file", interrupted)
        with pytest.raises(KeyboardInterrupt):
            store.import_file(src, "mine", root=root, move=True)
    assert src.is_file() and src.read_bytes() == tiny_gguf.read_bytes()  # still the user's
    assert store.find("mine:f32", root) is None
    store.import_file(src, "mine", root=root, move=True)
    assert not src.exists()
    assert resolve.resolve("mine", models_dir=root).read_bytes() == tiny_gguf.read_bytes()


def test_import_refuses_invalid_file_and_duplicates(tmp_path: Path, tiny_gguf: Path, root: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 100)
    with pytest.raises(InvalidModelFileError):
        store.import_file(bad, "bad", root=root)
    assert not (root / "bad").exists()
    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    with pytest.raises(InvalidArgumentError, match="already in the store"):
        store.import_file(tiny_gguf, "tiny", "v1", root=root)
    with pytest.raises(InvalidArgumentError):
        store.import_file(tiny_gguf, "Bad Name!", root=root)


def test_resolve_fails_on_damaged_model_and_suggests_verify(tiny_gguf: Path, root: Path) -> None:
    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    f = root / "tiny" / "v1" / "tiny-v1.gguf"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, last byte flipped: the quick hash sees it
    f.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="damaged") as ei:
        resolve.resolve("tiny:v1", models_dir=root)
    assert "localllm models verify tiny:v1" in ei.value.hint
    res = store.verify("tiny:v1", root)
    assert res[0]["ok"] is False and "sha256" in res[0]["problem"]
    with open(f, "ab") as fh:  # a size change is caught without hashing
        fh.write(b"x")
    with pytest.raises(ModelIntegrityError, match="size"):
        resolve.resolve("tiny", models_dir=root)


def test_model_refuses_damaged_store_entry(tiny_gguf: Path, root: Path) -> None:
    from localllm import Model

    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    (root / "tiny" / "v1" / "tiny-v1.gguf").write_bytes(tiny_gguf.read_bytes()[:-64])
    with pytest.raises(ModelIntegrityError):
        Model("tiny:v1", models_dir=root)


def test_list_show_default_rm(tiny_gguf: Path, root: Path) -> None:
    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    time.sleep(0.01)
    store.import_file(tiny_gguf, "tiny", "v2", root=root)
    refs = [e["ref"] for e in store.list_models(root)]
    assert refs == ["tiny:v2", "tiny:v1"]  # newest first
    assert resolve.resolve("tiny", models_dir=root).parent.name == "v2"
    resolve.set_default("tiny:v1", root)
    assert resolve.resolve(None, models_dir=root).parent.name == "v1"
    assert [e["ref"] for e in store.list_models(root) if e["default"]] == ["tiny:v1"]
    assert store.show("tiny:v1", root)["default"] is True
    assert store.remove("tiny:v1", root) == ["tiny:v1"]
    assert not (root / "default").exists()  # the default named what was removed
    assert store.remove("tiny", root) == ["tiny:v2"]
    assert not (root / "tiny").exists()
    with pytest.raises(ModelNotFoundError):
        store.remove("tiny", root)
    with pytest.raises(ModelNotFoundError):
        store.show("tiny", root)


def test_cli_json_roundtrip(tiny_gguf: Path, root: Path) -> None:
    d = str(root)
    rc, out = cli("models", "import", str(tiny_gguf), "--name", "tiny", "--version", "v1", "--json", "--models-dir", d)
    assert rc == 0 and json.loads(out)["ref"] == "tiny:v1"
    rc, out = cli("models", "list", "--json", "--models-dir", d)
    assert [m["ref"] for m in json.loads(out)["models"]] == ["tiny:v1"]
    rc, out = cli("models", "show", "tiny", "--json", "--models-dir", d)
    assert json.loads(out)["sha256"] == store.sha256_file(tiny_gguf)
    rc, out = cli("models", "verify", "--json", "--models-dir", d)
    assert rc == 0 and json.loads(out)["ok"] is True
    rc, out = cli("models", "default", "tiny:v1", "--json", "--models-dir", d)
    assert json.loads(out)["default"] == "tiny:v1"
    rc, out = cli("models", "list", "--models-dir", d)
    assert "* tiny:v1" in out
    (root / "tiny" / "v1" / "tiny-v1.gguf").write_bytes(b"GGUF")
    rc, out = cli("models", "verify", "tiny:v1", "--models-dir", d)
    assert rc == 1 and "FAIL" in out
    rc, out = cli("models", "rm", "tiny:v1", "--json", "--models-dir", d)
    assert json.loads(out) == {"removed": ["tiny:v1"]}


# ---------------------------------------------------------------- pull (network faked at hf_hub_download only)

def _fake_hf_cache(tmp_path: Path, src: Path, repo: str, fname: str) -> Path:
    """An HF hub cache laid out as huggingface_hub writes it (blob + snapshot symlink)."""
    cache = tmp_path / "hf"
    rdir = cache / ("models--" + repo.replace("/", "--"))
    (rdir / "blobs").mkdir(parents=True)
    blob = rdir / "blobs" / "0123abcd"
    blob.write_bytes(src.read_bytes())
    snap = rdir / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    (snap / fname).symlink_to(blob)
    (rdir / "refs").mkdir()
    (rdir / "refs" / "main").write_text("c" * 40)
    return cache


def test_pull_offline_from_hf_cache(tmp_path: Path, tiny_gguf: Path, root: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    repo = "someone/Tiny-Llama-GGUF"
    cache = _fake_hf_cache(tmp_path, tiny_gguf, repo, "tiny-llama.F32.gguf")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    import huggingface_hub

    def fake_download(repo_id: str, filename: str, revision: str | None = None, **kw: object) -> str:
        p = cache / ("models--" + repo_id.replace("/", "--")) / "snapshots" / ("c" * 40) / filename
        if not p.exists():
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        return str(p)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    e = hub.pull(repo, quant="f32", root=root)
    assert e["ref"] == "tiny-llama:f32" and e["already_present"] is False
    assert e["source"] == {"hub": repo, "file": "tiny-llama.F32.gguf", "revision": "c" * 40}
    assert hub.pull(repo, file="tiny-llama.F32.gguf", root=root)["already_present"] is True
    with pytest.raises(ModelNotFoundError, match="no .gguf file for quant"):
        hub.pull(repo, quant="q4_k_m", root=root)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE"):
        hub.pull(repo, file="other.gguf", root=root)
    with pytest.raises(ModelNotFoundError, match="not in the Hugging Face cache"):
        hub.pull("nobody/missing", quant="q8_0", root=root)


def test_pick_file() -> None:
    files = ["README.md", "m-Q4_K_M.gguf", "m-Q4_K_S.gguf", "m-Q8_0.gguf", "m-f16-00001-of-00002.gguf"]
    assert hub.pick_file(files, "q4_k_m") == "m-Q4_K_M.gguf"
    assert hub.pick_file(files, "Q8_0") == "m-Q8_0.gguf"
    with pytest.raises(InvalidArgumentError, match="files match"):
        hub.pick_file(files, None)
    with pytest.raises(InvalidArgumentError, match="split GGUF"):
        hub.pick_file(files, "f16")
    assert hub.default_name("bartowski/SmolLM2-135M-Instruct-GGUF") == "smollm2-135m-instruct"


# ---------------------------------------------------------------- atomicity and locking, with real processes

_IMPORTER = textwrap.dedent("""
    import sys, time, shutil
    from pathlib import Path
    from localllm import store, resolve
    src, root, name, version, slow = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] == "1"
    def produce(tmp):
        data = Path(src).read_bytes()
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2]); f.flush()
            if slow:
                (root / "halfway").write_text("x")
                time.sleep(60)
            f.write(data[len(data) // 2:])
    store.add(produce, name, version, source={"path": src}, root=root)
""")


def _spawn(tiny: Path, root: Path, version: str, slow: bool) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _IMPORTER, str(tiny), str(root), "tiny", version, "1" if slow else "0"],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_two_concurrent_imports(tiny_gguf: Path, root: Path) -> None:
    root.mkdir(parents=True)
    procs = [_spawn(tiny_gguf, root, "v1", False) for _ in range(2)] + [_spawn(tiny_gguf, root, "v2", False)]
    assert [p.wait(timeout=60) for p in procs] == [0, 0, 0]
    assert sorted(e["ref"] for e in store.list_models(root)) == ["tiny:v1", "tiny:v2"]
    assert all(r["ok"] for r in store.verify(None, root))
    assert not list(root.glob(".tmp-*"))


def test_kill_mid_import_leaves_nothing_half_written(tiny_gguf: Path, root: Path) -> None:
    root.mkdir(parents=True)
    p = _spawn(tiny_gguf, root, "v1", True)
    deadline = time.time() + 30
    while not (root / "halfway").exists():
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    assert store.list_models(root) == []
    assert not (root / "tiny" / "v1").exists()
    with pytest.raises(ModelNotFoundError):
        resolve.resolve("tiny:v1", models_dir=root)
    # the lock died with the process; the next import succeeds and sweeps the leftover temp dir
    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    assert store.verify("tiny:v1", root)[0]["ok"]
    assert not list(root.glob(".tmp-*"))
