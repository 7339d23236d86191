"""The model store on disk: ``<root>/<name>/<version>/`` holding one ``.gguf`` and a
``manifest.json`` (sha256, size, source, quant). See :func:`localllm.settings.models_dir` for the root.

Manifests, hashes, atomic adds, listing, verifying and removing: a service any layer may call with
a store root or a version folder. It looks names up only among what is stored (:func:`find`) and
never materialises or measures anything: turning a reference into a path, built-ins included, is
:mod:`localllm.resolve`'s, at the doors.

Example:
    >>> parse_ref("smollm2-135m:q8_0")
    ('smollm2-135m', 'q8_0')
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from localllm import catalog, settings
from localllm.errors import (DiskFullError, InvalidArgumentError, ModelIntegrityError,
                             ModelNotFoundError)

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"
DEFAULT_FILE = "default"
_QUICK = 1 << 20  # bytes hashed at each end of the file by quick_hash


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name:version"`` → ``("name", "version")``; ``"name"`` → ``("name", None)``."""
    name, _, version = ref.partition(":")
    name = name.lower()
    if not _NAME.match(name) or (version and not _NAME.match(version.lower())):
        raise InvalidArgumentError(
            f"{ref!r} is not a model name: use NAME or NAME:VERSION (lowercase letters, digits, . _ -) "
            "or a path to a .gguf file", param="model")
    return name, (version.lower() or None)


def looks_like_path(ref: str) -> bool:
    """Whether ``ref`` is written as a file path rather than a store name."""
    return os.sep in ref or "/" in ref or ref.endswith(".gguf") or ref.startswith(".") or ref.startswith("~")


def _version_dirs(root: Path, name: str) -> list[Path]:
    d = root / name
    if not d.is_dir():
        return []
    out = [v for v in d.iterdir() if v.is_dir() and not v.name.startswith(".") and (v / MANIFEST).is_file()]
    return sorted(out, key=lambda v: read_manifest(v).get("created", ""), reverse=True)


def read_manifest(vdir: Path) -> dict[str, Any]:
    """The manifest of a version folder (``{}`` when missing or unreadable): the one reader of manifests."""
    try:
        m = json.loads((vdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def gguf_in(vdir: Path) -> Path:
    m = read_manifest(vdir)
    f = vdir / m.get("file", "")
    if m.get("file") and f.is_file():
        return f
    raise ModelNotFoundError(f"{vdir}: the manifest names no model file that exists",
                             hint="run `localllm models verify`", path=str(vdir))


def find(ref: str, root: Path) -> Path | None:
    """The version directory ``ref`` names in the store, or None (nothing is materialised).

    ``NAME`` picks a built-in's default version when stored, else the newest.
    """
    name, version = parse_ref(ref)
    if version is not None:
        vdir = root / name / version
        return vdir if (vdir / MANIFEST).is_file() else None
    b = catalog.BUILTIN.get(name)
    if b is not None:
        default = _auto_version(b, root) if b.default_version == "auto" else b.default_version
        if default is not None and (root / name / default / MANIFEST).is_file():
            return root / name / default
        if b.default_version == "auto":
            return None  # not chosen for this CPU yet: resolve() chooses
    dirs = _version_dirs(root, name)
    return dirs[0] if dirs else None


def quick_hash(path: Path) -> str:
    """sha256 of the first and last MiB plus the size: catches truncation,
    replacement and most corruption in two reads, not a full pass.

    Example:
        >>> quick_hash(Path("m.gguf"))                    # doctest: +SKIP
        '9f2c…'
    """
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(_QUICK))
        if size > _QUICK:
            f.seek(max(_QUICK, size - _QUICK))
            h.update(f.read(_QUICK))
    return h.hexdigest()


def check(vdir: Path) -> Path:
    """The GGUF in ``vdir`` after a cheap integrity check against its manifest
    (size, and the quick hash when the manifest has one).

    Raises ModelIntegrityError suggesting ``localllm models verify``.
    """
    m = read_manifest(vdir)
    f = gguf_in(vdir)
    ref = f"{m.get('name', vdir.parent.name)}:{m.get('version', vdir.name)}"
    size = f.stat().st_size
    problem = None
    if m.get("size") is not None and size != m["size"]:
        problem = f"its size is {size} bytes but the manifest says {m['size']}"
    elif m.get("quick_sha256") and quick_hash(f) != m["quick_sha256"]:
        problem = "its contents changed since it was stored (quick hash mismatch)"
    if problem:
        raise ModelIntegrityError(f"stored model {ref} is damaged: {problem}",
                                  hint=f"run `localllm models verify {ref}`, then `localllm models rm {ref}` "
                                       "and import or pull it again", path=str(f), name=ref)
    return f


def default_ref(root: Path) -> str:
    """The model used when none is given: the store's ``default`` pointer, else the built-in default."""
    p = root / DEFAULT_FILE
    if p.is_file():
        ref = p.read_text().strip()
        if ref:
            return ref
    return catalog.DEFAULT_MODEL


@contextlib.contextmanager
def locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the store (imports, pulls and removals take it)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _stale_temps(root: Path) -> None:
    """Remove temporary dirs left by killed imports. Only called under the
    lock, so no live import owns them."""
    for d in root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    """Full sha256 of ``path``; ``progress(n)`` is called after each chunk of n bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def add(produce: Callable[[Path], None], name: str, version: str, *, source: dict[str, Any],
        root: Path | None = None, extra: dict[str, Any] | None = None, exist_ok: bool = True) -> Path:
    """Atomically add a model: ``produce(tmp_path)`` writes the GGUF to a
    temporary file in the store, which is hashed and renamed into place with
    its manifest, under the store lock. A kill at any point leaves either
    nothing or a complete entry. An entry that is already there is kept: its
    path is returned, or, with ``exist_ok=False``, InvalidArgumentError says so
    (another process may have added it while this one waited for the lock).
    A full disk (or file-size limit) is a DiskFullError, with nothing left behind.
    """
    root = root or settings.models_dir()
    parse_ref(f"{name}:{version}")
    from localllm import __version__, validate

    vdir = root / name / version
    with locked(root):
        if (vdir / MANIFEST).is_file():
            if not exist_ok:
                raise InvalidArgumentError(f"{name}:{version} is already in the store",
                                           hint=f"pick another --version, or `localllm models rm {name}:{version}` "
                                                "first", param="version")
            return gguf_in(vdir)
        _stale_temps(root)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{version}-", dir=root))
        try:
            fname = f"{name}-{version}.gguf"
            tmp = tmpdir / fname
            try:
                produce(tmp)
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                    raise
                raise DiskFullError(f"{root}: {e.strerror or e} while writing {name}:{version} (the disk is full, "
                                    "or a file-size limit); nothing was added",
                                    hint="free some space, or use another --models-dir") from None
            summary = validate.summary(tmp)
            manifest = {
                "name": name, "version": version, "file": fname,
                "sha256": sha256_file(tmp), "quick_sha256": quick_hash(tmp), "size": tmp.stat().st_size,
                "arch": summary.get("arch"), "quant": summary.get("quant"),
                "parameters": summary.get("parameters"),
                "source": source, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "localllm_version": __version__, **(extra or {}),
            }
            (tmpdir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            for f in (tmp, tmpdir / MANIFEST):  # durable before the rename makes them visible
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            vdir.parent.mkdir(parents=True, exist_ok=True)
            if vdir.exists():  # a leftover without manifest (killed before rename): replace
                shutil.rmtree(vdir)
            os.replace(tmpdir, vdir)
        finally:
            if tmpdir.exists():
                shutil.rmtree(tmpdir, ignore_errors=True)
    return vdir / fname


AUTO = "auto.json"  # NAME/auto.json: the version chosen for NAME on this machine, and on which feature set


def record_auto_version(b: catalog.Builtin, root: Path, version: str, feature_set: str) -> None:
    """Remember ``version`` as the one chosen for ``b`` on CPUs of ``feature_set`` (atomically)."""
    root.joinpath(b.name).mkdir(parents=True, exist_ok=True)
    tmp = root / b.name / f".{AUTO}.{os.getpid()}"
    tmp.write_text(json.dumps({"version": version, "feature_set": feature_set}) + "\n")
    os.replace(tmp, root / b.name / AUTO)


def _auto_version(b: catalog.Builtin, root: Path) -> str | None:
    """The version chosen earlier for this CPU's feature set, if any."""
    try:
        rec = json.loads((root / b.name / AUTO).read_text())
        return str(rec["version"]) if rec.get("feature_set") == catalog.feature_set() else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


# --------------------------------------------------------------------------- store commands
# Each returns plain data (the CLI's --json output); none prints.

def _entry(vdir: Path, default: Path | None) -> dict[str, Any]:
    m = read_manifest(vdir)
    name, version = vdir.parent.name, vdir.name
    return {"name": name, "version": version, "ref": f"{name}:{version}", "path": str(vdir / m.get("file", "")),
            "size": m.get("size"), "quant": m.get("quant"), "arch": m.get("arch"),
            "parameters": m.get("parameters"), "created": m.get("created"), "default": vdir == default}


def _default_vdir(root: Path) -> Path | None:
    """The version dir the default reference picks (same rules as resolve)."""
    try:
        return find(default_ref(root), root)
    except InvalidArgumentError:
        return None


def list_models(root: Path | None = None) -> list[dict[str, Any]]:
    """Every stored model version, by name then newest first.

    Example:
        >>> [e["ref"] for e in list_models()]              # doctest: +SKIP
        ['gemma3-270m:q4_k_m', 'smollm2-135m:q8_0']
    """
    root = root or settings.models_dir()
    if not root.is_dir():
        return []
    default = _default_vdir(root)
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out.extend(_entry(v, default) for v in _version_dirs(root, d.name))
    return out


def _require(ref: str, root: Path) -> Path:
    vdir = find(ref, root)
    if vdir is None:
        raise ModelNotFoundError(f"no model {ref!r} in the store at {root}",
                                 hint="run `localllm models list`", name=ref)
    return vdir


def show(ref: str, root: Path | None = None) -> dict[str, Any]:
    """The manifest of ``NAME[:VERSION]`` plus its path and header facts (context length, layers).

    Example:
        >>> show("smollm2-135m")["quant"]                  # doctest: +SKIP
        'Q8_0'
    """
    from localllm import validate

    root = root or settings.models_dir()
    vdir = _require(ref, root)
    m = read_manifest(vdir)
    f = gguf_in(vdir)
    h = validate.read_header(f)
    return {**m, "ref": f"{vdir.parent.name}:{vdir.name}", "path": str(f),
            "default": vdir == _default_vdir(root),
            "context_length": h.get("context_length"), "block_count": h.get("block_count"),
            "embedding_length": h.get("embedding_length"), "vocab_size": h.array_lengths.get("tokenizer.ggml.tokens"),
            "tensors": len(h.tensors)}


def verify(ref: str | None = None, root: Path | None = None,
           progress: Callable[[str, int, Callable[[int], None] | None], Callable[[int], None] | None] | None = None,
           ) -> list[dict[str, Any]]:
    """Full sha256 of one stored model (or all) against the manifest.

    ``progress(ref, size)`` may return a callback that receives byte counts
    (the CLI passes a tqdm bar). Returns one ``{ref, ok, problem, ...}`` per model.

    Example:
        >>> verify("smollm2-135m")[0]["ok"]                # doctest: +SKIP
        True
    """
    root = root or settings.models_dir()
    vdirs = [_require(ref, root)] if ref else [Path(e["path"]).parent for e in list_models(root)]
    out = []
    for vdir in vdirs:
        m = read_manifest(vdir)
        r = f"{vdir.parent.name}:{vdir.name}"
        res: dict[str, Any] = {"ref": r, "ok": False, "problem": None, "expected_sha256": m.get("sha256"),
                               "sha256": None}
        try:
            f = gguf_in(vdir)
            size = f.stat().st_size
            cb = progress(r, size, None) if progress else None
            res["sha256"] = sha256_file(f, cb)
            if m.get("size") is not None and size != m["size"]:
                res["problem"] = f"size {size} != manifest {m['size']}"
            elif res["sha256"] != m.get("sha256"):
                res["problem"] = "sha256 differs from the manifest"
            else:
                res["ok"] = True
        except (OSError, ModelNotFoundError) as e:
            res["problem"] = str(e)
        out.append(res)
    return out


def remove(ref: str, root: Path | None = None) -> list[str]:
    """Delete ``NAME:VERSION``, or every version of ``NAME``; returns the refs removed.
    Clears the default pointer when it named what was removed.

    Example:
        >>> remove("mymodel:v1")                           # doctest: +SKIP
        ['mymodel:v1']
    """
    root = root or settings.models_dir()
    name, version = parse_ref(ref)
    with locked(root):
        vdirs = [_require(ref, root)] if version else _version_dirs(root, name)
        if not vdirs:
            raise ModelNotFoundError(f"no model {ref!r} in the store at {root}",
                                     hint="run `localllm models list`", name=ref)
        removed = []
        for vdir in vdirs:
            # rename first so a kill mid-delete never leaves a half-deleted entry that looks whole
            trash = root / f".tmp-rm-{name}-{vdir.name}-{os.getpid()}"
            os.replace(vdir, trash)
            shutil.rmtree(trash, ignore_errors=True)
            removed.append(f"{name}:{vdir.name}")
        if (root / name).is_dir() and not any((root / name).iterdir()):
            (root / name).rmdir()
        # a default that no longer names anything stored falls back to the built-in default
        if (root / DEFAULT_FILE).is_file() and _default_vdir(root) is None:
            (root / DEFAULT_FILE).unlink()
    return removed


def write_default(root: Path, ref: str) -> dict[str, Any]:
    """Point the store's ``default`` at ``ref`` (checked by the caller: :func:`localllm.resolve.set_default`)."""
    with locked(root):
        tmp = root / f".tmp-default-{os.getpid()}"
        tmp.write_text(ref + "\n")
        os.replace(tmp, root / DEFAULT_FILE)
    return {"default": ref}


def import_file(path: str | os.PathLike[str], name: str, version: str | None = None, *,
                root: Path | None = None, move: bool = False) -> dict[str, Any]:
    """Copy a GGUF into the store as ``name:version`` (version defaults to its quant, e.g. ``q8_0``).

    The file is validated before anything is written; the copy is atomic and locked.

    Example:
        >>> import_file("x.gguf", "mymodel")["ref"]        # doctest: +SKIP
        'mymodel:q8_0'
    """
    from localllm import validate

    root = root or settings.models_dir()
    src = Path(path).expanduser().resolve()
    info = validate.summary(src)
    version = version or version_from_quant(info.get("quant"))
    name, _ = parse_ref(f"{name}:{version}")
    if find(f"{name}:{version}", root) is not None:
        raise InvalidArgumentError(f"{name}:{version} is already in the store",
                                   hint=f"pick another --version, or `localllm models rm {name}:{version}` first",
                                   param="version")

    def produce(tmp: Path) -> None:
        if move:
            try:  # same filesystem: a second name, no copy; the original stays until the import is whole
                os.link(src, tmp)
                return
            except OSError:
                pass
        shutil.copyfile(src, tmp)

    add(produce, name, version.lower(), source={"path": str(src)}, root=root, exist_ok=False)
    if move:  # only now: a failed or interrupted import must never lose the user's file
        src.unlink(missing_ok=True)
    return show(f"{name}:{version.lower()}", root)


def version_from_quant(quant: str | None) -> str:
    q = (quant or "").lower()
    return q if q and _NAME.match(q) and not q.startswith("type") and q != "unknown" else "v1"
