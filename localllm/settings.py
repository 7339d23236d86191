"""Where localllm keeps things, resolved when asked (never at import time).

Precedence for the model store:

1. an explicit ``models_dir`` argument (the CLI's ``--models-dir``);
2. ``$LOCALLLM_HOME/models`` when ``LOCALLLM_HOME`` is set: it moves
   *everything* localllm writes;
3. the checkout's top-level ``models/`` when running from a source checkout;
4. ``$XDG_DATA_HOME/localllm/models`` (``~/.local/share/localllm/models``):
   models are user data that should survive cache cleaners, unlike
   ``~/.cache``.

Example:
    >>> import os; os.environ["LOCALLLM_HOME"] = "/tmp/ll"
    >>> str(models_dir())
    '/tmp/ll/models'
"""

from __future__ import annotations

import os
from pathlib import Path


def _checkout_root() -> Path | None:
    """The source checkout this package runs from, if any (has setup.cfg + models/)."""
    root = Path(__file__).resolve().parent.parent
    if (root / "setup.cfg").is_file() and (root / "models").is_dir():
        return root
    return None


def home() -> Path:
    """Root of everything localllm writes (store, caches, locks)."""
    env = os.environ.get("LOCALLLM_HOME")
    if env:
        return Path(env).expanduser()
    root = _checkout_root()
    if root is not None:
        return root / ".localllm"
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "localllm"


def models_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """The model store root (see module docstring for precedence)."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("LOCALLLM_HOME"):
        return home() / "models"
    root = _checkout_root()
    if root is not None:
        return root / "models"
    return home() / "models"


def cache_dir() -> Path:
    """Scratch space (built benchmark tools, test fixtures)."""
    return home() / "cache"


def debug() -> bool:
    """``LOCALLLM_DEBUG=1`` makes the CLI show tracebacks."""
    return os.environ.get("LOCALLLM_DEBUG", "") not in ("", "0", "false", "no")


def verbose() -> bool:
    """``LOCALLLM_VERBOSE=1`` lets llama.cpp's own log through to stderr."""
    return os.environ.get("LOCALLLM_VERBOSE", "") not in ("", "0", "false", "no")


def hugepages() -> bool:
    """``LOCALLLM_HUGEPAGES=0`` stops the loader asking for transparent huge pages
    for the weights (runtime/_hugepages.py), and so keeps them mapped from the file
    unless ``mmap=False`` is asked for (hardware.weights_in_memory)."""
    return os.environ.get("LOCALLLM_HUGEPAGES", "1").strip().lower() not in ("0", "false", "no", "off")


def memory_check() -> bool:
    """``LOCALLLM_MEMORY_CHECK=0`` loads a model that the plan says does not fit the RAM available
    (mapped, llama.cpp would page it in from disk for every token: minutes per token)."""
    return os.environ.get("LOCALLLM_MEMORY_CHECK", "1").strip().lower() not in ("0", "false", "no", "off")


def amx() -> bool:
    """``LOCALLLM_AMX=1`` lets llama.cpp put weights in its AMX buffers where the build has them
    (off by default: they crash on batches of 2+ tokens, see runtime._lib.extra_buffers_usable)."""
    return os.environ.get("LOCALLLM_AMX", "").strip().lower() in ("1", "true", "yes", "on")


def default_threads() -> int:
    """Threads for decoding: physical cores are best for llama.cpp; we use the
    affinity mask (containers) and leave hyperthreads out when we can tell."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        n = os.cpu_count() or 1
    return max(1, n)
