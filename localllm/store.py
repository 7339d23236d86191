"""The model store: ``<root>/<name>/<version>/`` holding one ``.gguf`` and a
``manifest.json``. See :func:`localllm.settings.models_dir` for the root.

A reference is a path to a ``.gguf`` file, ``NAME`` (its newest version, or
the version ``default`` points at) or ``NAME:VERSION``. Built-in models (see
:mod:`localllm.catalog`) are materialised into the store on first use.

Example:
    >>> resolve("smollm2-135m")                       # doctest: +SKIP
    PosixPath('.../models/smollm2-135m/q8_0/smollm2-135m-q8_0.gguf')
"""

from __future__ import annotations

import contextlib
import datetime
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
from localllm.errors import InvalidArgumentError, InvalidModelFileError, ModelNotFoundError

_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
MANIFEST = "manifest.json"


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``"name:version"`` → ``("name", "version")``; ``"name"`` → ``("name", None)``."""
    name, _, version = ref.partition(":")
    name = name.lower()
    if not _NAME.match(name) or (version and not _NAME.match(version.lower())):
        raise InvalidArgumentError(
            f"{ref!r} is not a model name: use NAME or NAME:VERSION (lowercase letters, digits, . _ -) "
            "or a path to a .gguf file", param="model")
    return name, (version.lower() or None)


def _looks_like_path(ref: str) -> bool:
    return os.sep in ref or "/" in ref or ref.endswith(".gguf") or ref.startswith(".") or ref.startswith("~")


def _version_dirs(root: Path, name: str) -> list[Path]:
    d = root / name
    if not d.is_dir():
        return []
    out = [v for v in d.iterdir() if v.is_dir() and (v / MANIFEST).is_file()]
    return sorted(out, key=lambda v: _manifest(v).get("created", ""), reverse=True)


def _manifest(vdir: Path) -> dict[str, Any]:
    try:
        return json.loads((vdir / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def gguf_in(vdir: Path) -> Path:
    m = _manifest(vdir)
    f = vdir / m.get("file", "")
    if m.get("file") and f.is_file():
        return f
    raise ModelNotFoundError(f"{vdir}: the manifest names no model file that exists",
                             hint="run `localllm models verify`", path=str(vdir))


def default_ref(root: Path) -> str:
    """The model used when none is given: the store's ``default`` pointer, else the built-in default."""
    p = root / "default"
    if p.is_file():
        ref = p.read_text().strip()
        if ref:
            return ref
    return catalog.DEFAULT_MODEL


def resolve(ref: str | os.PathLike[str] | None, *, models_dir: str | os.PathLike[str] | None = None) -> Path:
    """Turn a model reference into the path of a GGUF file that exists.

    Raises ModelNotFoundError with a next step when it cannot.
    """
    root = settings.models_dir(models_dir)
    if ref is None or ref == "":
        ref = default_ref(root)
    if isinstance(ref, os.PathLike) or _looks_like_path(str(ref)) or Path(str(ref)).is_file():
        p = Path(ref).expanduser()
        if p.is_dir():
            raise InvalidModelFileError(f"{p} is a directory, not a .gguf file",
                                        hint="pass the .gguf file inside it", path=str(p))
        if not p.exists():
            raise ModelNotFoundError(f"model file {p} does not exist",
                                     hint="check the path, or run `localllm models list` for stored models",
                                     path=str(p))
        return p
    name, version = parse_ref(str(ref))
    if version is not None:
        vdir = root / name / version
        if (vdir / MANIFEST).is_file():
            return gguf_in(vdir)
    else:
        dirs = _version_dirs(root, name)
        b = catalog.BUILTIN.get(name)
        if b is not None and (root / name / b.default_version / MANIFEST).is_file():
            return gguf_in(root / name / b.default_version)
        if dirs:
            return gguf_in(dirs[0])
    b = catalog.BUILTIN.get(name)
    if b is not None:
        return materialize(b, version or b.default_version, root)
    known = sorted({p.name for p in root.iterdir() if p.is_dir()} | set(catalog.BUILTIN)) if root.is_dir() \
        else sorted(catalog.BUILTIN)
    what = f"{name}:{version}" if version else name
    raise ModelNotFoundError(f"no model {what!r} in {root} (known: {', '.join(known)})",
                             hint="run `localllm models list`, or pass a path to a .gguf file", name=name)


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


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest()


def add(produce: Callable[[Path], None], name: str, version: str, *, source: dict[str, Any],
        root: Path | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Atomically add a model: ``produce(tmp_path)`` writes the GGUF to a
    temporary file in the store, which is hashed and renamed into place with
    its manifest, under the store lock. A kill at any point leaves either
    nothing or a complete entry.
    """
    root = root or settings.models_dir()
    parse_ref(f"{name}:{version}")
    from localllm import __version__, validate

    vdir = root / name / version
    with locked(root):
        if (vdir / MANIFEST).is_file():
            return gguf_in(vdir)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-{version}-", dir=root))
        try:
            fname = f"{name}-{version}.gguf"
            tmp = tmpdir / fname
            produce(tmp)
            summary = validate.summary(tmp)
            manifest = {
                "name": name, "version": version, "file": fname,
                "sha256": sha256_file(tmp), "size": tmp.stat().st_size,
                "arch": summary.get("arch"), "quant": summary.get("quant"),
                "parameters": summary.get("parameters"),
                "source": source, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                "localllm_version": __version__, **(extra or {}),
            }
            (tmpdir / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            vdir.parent.mkdir(parents=True, exist_ok=True)
            if vdir.exists():  # a leftover without manifest (killed before rename): replace
                shutil.rmtree(vdir)
            os.replace(tmpdir, vdir)
        finally:
            if tmpdir.exists():
                shutil.rmtree(tmpdir, ignore_errors=True)
    return vdir / fname


def materialize(b: catalog.Builtin, version: str, root: Path) -> Path:
    """Put built-in model ``b`` at ``version`` into the store (requantizing if needed)."""
    if version not in b.versions:
        raise ModelNotFoundError(f"built-in model {b.name!r} has no version {version!r} "
                                 f"(available: {', '.join(b.versions)})", name=b.name)
    ftype = b.versions[version]

    def produce(tmp: Path) -> None:
        src = catalog.shipped_file(b, tmp.parent)
        if ftype is None:
            if src.parent == tmp.parent:
                os.replace(src, tmp)
            else:
                shutil.copyfile(src, tmp)
        else:
            from localllm import runtime

            runtime.quantize(src, tmp, ftype, nthread=settings.default_threads(), allow_requantize=True)
            if src.parent == tmp.parent:
                src.unlink()

    source = {"builtin": b.name, "package": b.pip.split()[0], "license": b.license,
              "requantized_to": version if ftype is not None else None}
    return add(produce, b.name, version, source=source, root=root)
