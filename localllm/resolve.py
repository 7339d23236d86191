"""Names to paths: the one place a model reference (``NAME``, ``NAME:VERSION``, a path, or none for the
default) becomes the path of a GGUF that exists. Only the doors (``Model``, the CLI, the server) call it;
every layer below takes a path.

A built-in model (:mod:`localllm.catalog`) is materialised into the store on first use, and the default
model's version is chosen for this CPU then: from the measured table, else by measuring the candidates
here (:mod:`localllm.autoquant`). That is why resolving sits above the measuring layer, and why nothing
below a door may resolve a name.

Example:
    >>> resolve("smollm2-135m")                       # doctest: +SKIP
    PosixPath('.../models/smollm2-135m/q8_0/smollm2-135m-q8_0.gguf')
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from localllm import catalog, settings, store
from localllm.errors import InvalidArgumentError, InvalidModelFileError, ModelNotFoundError


def resolve(ref: str | os.PathLike[str] | None, *, models_dir: str | os.PathLike[str] | None = None,
            notes: list[str] | None = None) -> Path:
    """Turn a model reference into the path of a GGUF file that exists.

    Raises ModelNotFoundError with a next step when it cannot. What the user
    should hear (a version chosen for this CPU) is appended to ``notes``.
    """
    root = settings.models_dir(models_dir)
    if ref is None or ref == "":
        ref = store.default_ref(root)
    if isinstance(ref, os.PathLike) or store.looks_like_path(str(ref)) or Path(str(ref)).is_file():
        p = Path(ref).expanduser()
        if p.is_dir():
            raise InvalidModelFileError(f"{p} is a directory, not a .gguf file",
                                        hint="pass the .gguf file inside it", path=str(p))
        if not p.exists():
            raise ModelNotFoundError(f"model file {p} does not exist",
                                     hint="check the path, or run `localllm models list` for stored models",
                                     path=str(p))
        return p
    vdir = store.find(str(ref), root)
    if vdir is not None:
        return store.check(vdir)
    name, version = store.parse_ref(str(ref))
    b = catalog.BUILTIN.get(name)
    if b is not None:
        if version is None and b.default_version == "auto":
            return materialize_auto(b, root, notes)
        return materialize(b, version or b.default_version, root)
    known = sorted({p.name for p in root.iterdir() if p.is_dir()} | set(catalog.BUILTIN)) if root.is_dir() \
        else sorted(catalog.BUILTIN)
    what = f"{name}:{version}" if version else name
    raise ModelNotFoundError(f"no model {what!r} in {root} (known: {', '.join(known)})",
                             hint="run `localllm models list`, or pass a path to a .gguf file", name=name)


def is_model_ref(arg: str, models_dir: str | os.PathLike[str] | None = None) -> bool:
    """Whether ``arg`` names a model (a .gguf path, a built-in or a stored name) rather than being
    a prompt, without materialising anything (``localllm run MODEL|PROMPT``)."""
    if arg.endswith(".gguf") or Path(arg).expanduser().is_file():
        return True
    try:
        name, _ = store.parse_ref(arg)
    except InvalidArgumentError:
        return False
    return name in catalog.BUILTIN or (settings.models_dir(models_dir) / name).is_dir()


def auto_candidates(b: catalog.Builtin) -> list[str]:
    """The versions ``auto`` chooses among, as quant names (those :mod:`localllm.autoquant` measures)."""
    from localllm.autoquant import CANDIDATES

    return [q for q in CANDIDATES if q.lower() in b.versions]


def _source(b: catalog.Builtin, requantized_to: str | None) -> dict[str, Any]:
    return {"builtin": b.name, "package": b.pip.split()[0], "license": b.license, "requantized_to": requantized_to}


def materialize(b: catalog.Builtin, version: str, root: Path, extra: dict[str, Any] | None = None) -> Path:
    """Put built-in model ``b`` at ``version`` into the store (requantizing if needed)."""
    if version not in b.versions:
        raise ModelNotFoundError(f"built-in model {b.name!r} has no version {version!r} "
                                 f"(available: {', '.join(b.versions)})", name=b.name)
    quant = b.versions[version]

    def produce(tmp: Path) -> None:
        src = catalog.shipped_file(b, tmp.parent)
        if quant is None:
            if src.parent == tmp.parent:
                os.replace(src, tmp)
            else:
                shutil.copyfile(src, tmp)
        else:
            from localllm import runtime
            from localllm.formats import QUANTS

            runtime.quantize(src, tmp, QUANTS[quant].ftype, nthread=settings.default_threads(),
                             allow_requantize=True)
            if src.parent == tmp.parent:
                src.unlink()

    return store.add(produce, b.name, version, source=_source(b, version if quant is not None else None),
                     root=root, extra=extra)


def materialize_auto(b: catalog.Builtin, root: Path, notes: list[str] | None = None) -> Path:
    """Choose ``b``'s version for this CPU (from the measured table, else by measuring now) and store it."""
    key = catalog.feature_set()
    entry = catalog.quant_table().get(b.name, {}).get(key)
    t0 = time.perf_counter()
    if entry is not None and str(entry.get("quant", "")).lower() in b.versions:
        version = str(entry["quant"]).lower()
        path = materialize(b, version, root, extra={"quant_choice": {**entry, "source": f"table:{key}"}})
        why = (f"from the table measured on {key} CPUs ({entry.get('cpu', {}).get('model', '?')}, "
               f"{entry.get('date', '?')}; benchmarks/default_choice.py)")
    else:
        path = _measure_builtin(b, root, key)
        version = path.parent.name
        why = f"measured on this CPU ({key}, not in the table) in {time.perf_counter() - t0:.0f} s"
    store.record_auto_version(b, root, version, key)
    if notes is not None:
        notes.append(f"{b.name}: using {version}, the fastest version within the KL budget {why}; "
                     f"the measured table: `localllm models show {b.name}:{version}`")
    return path


def _measure_builtin(b: catalog.Builtin, root: Path, key: str) -> Path:
    """Measure every candidate version of ``b`` here; store and return the chosen one."""
    from localllm import autoquant, runtime
    from localllm.formats import QUANTS

    with autoquant.workdir(root) as work:
        ref = work / "reference-f32.gguf"  # the shipped weights exactly, at F32
        runtime.quantize(catalog.shipped_file(b, work), ref, QUANTS["F32"].ftype, nthread=settings.default_threads(),
                         allow_requantize=True)
        decision, files = autoquant.choose(ref, work, candidates=auto_candidates(b))
        chosen = files[decision.quant]
        return store.add(lambda tmp: os.replace(chosen, tmp), b.name, decision.quant.lower(),
                         source=_source(b, decision.quant.lower()), root=root,
                         extra={"quant_choice": {**decision.to_dict(), "feature_set": key}})


def set_default(ref: str, root: Path | None = None) -> dict[str, Any]:
    """Make ``NAME[:VERSION]`` the model used when none is given (materialising a built-in).

    Example:
        >>> set_default("gemma3-270m")["default"]          # doctest: +SKIP
        'gemma3-270m'
    """
    root = root or settings.models_dir()
    name, version = store.parse_ref(ref)
    path = resolve(ref, models_dir=root)  # must exist (materialises a built-in)
    return {**store.write_default(root, f"{name}:{version}" if version else name), "path": str(path)}


__all__ = ["resolve", "is_model_ref", "auto_candidates", "materialize", "materialize_auto", "set_default"]
