"""``localllm models pull``: fetch a GGUF from the Hugging Face Hub into the store.

Downloads go through huggingface-hub, so its cache (``HF_HOME``,
``HF_HUB_CACHE``), token and ``HF_HUB_OFFLINE=1`` apply as usual: offline,
only files already in the HF cache can be pulled. The store entry is a hard
link to the cached blob when both are on one filesystem (no second copy),
else a copy; either way it is hashed and renamed into place atomically.

Example:
    >>> pull("bartowski/SmolLM2-135M-Instruct-GGUF", quant="Q8_0")["ref"]   # doctest: +SKIP
    'smollm2-135m-instruct:q8_0'
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from localllm import settings, store
from localllm.errors import InvalidArgumentError, ModelNotFoundError, PrerequisiteError

_SPLIT = re.compile(r"-\d{5}-of-\d{5}\.gguf$")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def repo_files(repo: str, revision: str | None = None) -> list[str]:
    """Files in a hub repo: from the Hub, or from the local HF cache when offline."""
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    if _offline():
        from huggingface_hub import constants

        d = Path(constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--")) / "snapshots"
        if not d.is_dir():
            raise ModelNotFoundError(f"{repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set",
                                     hint="unset HF_HUB_OFFLINE to download it", name=repo)
        snaps = [d / revision] if revision and (d / revision).is_dir() else sorted(d.iterdir())
        return sorted({str(f.relative_to(s)) for s in snaps for f in s.rglob("*") if f.is_file() or f.is_symlink()})
    try:
        return hf.list_repo_files(repo, revision=revision)
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no repository {repo!r} on the Hugging Face Hub (or it is private)",
                                 hint="check the name, or `hf auth login` for a private repo", name=repo) from None
    except (hf_errors.HfHubHTTPError, OSError) as e:
        raise PrerequisiteError(f"could not list {repo} on the Hugging Face Hub: {e}",
                                hint="check the network, or set HF_HUB_OFFLINE=1 to use the cache") from None


def pick_file(files: list[str], quant: str | None) -> str:
    """The one ``.gguf`` among ``files`` matching ``quant`` (case-insensitive), or the only one."""
    ggufs = [f for f in files if f.lower().endswith(".gguf")]
    if quant:
        q = quant.lower()
        ggufs = [f for f in ggufs if re.search(rf"(^|[-_.]){re.escape(q)}([-_.]|$)", Path(f).name.lower()[:-5] + ".")]
    if not ggufs:
        what = f"no .gguf file for quant {quant!r}" if quant else "no .gguf file"
        raise ModelNotFoundError(f"{what} in the repository (files: {', '.join(files[:20])})",
                                 hint="pass --file with one of the repository's files")
    if len(ggufs) > 1:
        raise InvalidArgumentError(f"{len(ggufs)} files match: {', '.join(ggufs[:20])}",
                                   hint="pass --quant or --file to pick one", param="file")
    if _SPLIT.search(ggufs[0]):
        raise InvalidArgumentError(f"{ggufs[0]} is one part of a split GGUF, which the store does not take",
                                   hint="merge it with llama-gguf-split --merge, then `localllm models import`",
                                   param="file")
    return ggufs[0]


def default_name(repo: str) -> str:
    """``"bartowski/SmolLM2-135M-Instruct-GGUF"`` → ``"smollm2-135m-instruct"``."""
    n = repo.split("/")[-1].lower()
    n = re.sub(r"[-_.]gguf$", "", n)
    n = re.sub(r"[^a-z0-9._-]+", "-", n).strip("-._")
    return n[:64] or "model"


def pull(repo: str, *, file: str | None = None, quant: str | None = None, revision: str | None = None,
         name: str | None = None, version: str | None = None, root: Path | None = None) -> dict[str, Any]:
    """Download ``file`` (or the one matching ``quant``) from ``repo`` into the store.

    Returns the stored entry (as :func:`localllm.store.show`).
    """
    import huggingface_hub as hf
    from huggingface_hub import errors as hf_errors

    if file and quant:
        raise InvalidArgumentError("pass --file or --quant, not both", param="file")
    root = root or settings.models_dir()
    fname = file or pick_file(repo_files(repo, revision), quant)
    try:
        cached = Path(hf.hf_hub_download(repo, fname, revision=revision))
    except hf_errors.LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if _offline() else "the Hub could not be reached"
        raise ModelNotFoundError(f"{repo}/{fname} is not in the Hugging Face cache and {why}",
                                 hint="check the network (and unset HF_HUB_OFFLINE) to download it",
                                 name=repo) from None
    except hf_errors.EntryNotFoundError:
        raise ModelNotFoundError(f"{repo} has no file {fname!r}", hint="check --file", name=repo) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelNotFoundError(f"no repository {repo!r} on the Hugging Face Hub", name=repo) from None
    # the cache path is .../snapshots/<commit>/<file>: record the exact revision
    parts = cached.parts
    commit = parts[parts.index("snapshots") + 1] if "snapshots" in parts else revision
    from localllm import validate

    info = validate.summary(cached)  # refuse a bad file before copying anything
    name = name or default_name(repo)
    version = (version or store.version_from_quant(info.get("quant"))).lower()
    if store.find(f"{name}:{version}", root) is not None:
        return {**store.show(f"{name}:{version}", root), "already_present": True}

    def produce(tmp: Path) -> None:
        blob = cached.resolve()
        try:
            os.link(blob, tmp)  # same filesystem: share the HF cache's blob (read-only by convention)
        except OSError:
            shutil.copyfile(blob, tmp)

    store.add(produce, name, version, root=root,
              source={"hub": repo, "file": fname, "revision": commit})
    return {**store.show(f"{name}:{version}", root), "already_present": False}
