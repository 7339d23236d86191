"""What differs between architectures, as data: :class:`ArchRule`.

Each supported architecture is one small module in the ``localllm/archs/``
folder (shipped as ``localllm.archs``) defining ``RULE = ArchRule(...)``.
Adding an architecture that llama.cpp already runs means adding one such file.

Example:
    >>> rule_for({"architectures": ["Qwen2ForCausalLM"]}).gguf_arch
    'qwen2'
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localllm.errors import UnsupportedArchitectureError

# extra hyperparameters: a function of the (text) config returning GGUF key
# suffixes (after "{arch}.") and values; used for what the generic writer lacks
ExtraKV = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class ArchRule:
    """The conversion rules of one HF architecture.

    ``permute_qk``: HF stores llama-family Q/K in half-split RoPE order; llama.cpp
    wants them interleaved. ``norm_plus_one``: Gemma's RMSNorm computes x·(1+w)
    while llama.cpp computes x·w. ``trim_embeddings``: cut ``token_embd`` to the
    tokenizer's size (Gemma3 pads it for image tokens).
    """

    hf_architectures: tuple[str, ...]
    gguf_arch: str
    permute_qk: bool = False
    norm_plus_one: bool = False
    tied_default: bool = False  # tie_word_embeddings when the config does not say
    trim_embeddings: bool = False
    add_space_prefix: bool | None = None  # SentencePiece: llama.cpp's default is True
    skip_suffixes: tuple[str, ...] = ("rotary_emb.inv_freq",)
    extra_kv: ExtraKV | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


@functools.cache
def all_rules() -> dict[str, ArchRule]:
    """HF architecture name → rule, from every module in ``localllm.archs``."""
    import localllm.archs as pkg

    out: dict[str, ArchRule] = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"localllm.archs.{info.name}")
        # a module defines RULE, or RULES when one family has several
        for rule in getattr(mod, "RULES", None) or (getattr(mod, "RULE", None),):
            if isinstance(rule, ArchRule):
                for name in rule.hf_architectures:
                    out[name] = rule
    return out


def rule_for(config: dict[str, Any]) -> ArchRule:
    """The rule for a HF config's ``architectures``; unknown ones list what is supported."""
    archs = config.get("architectures") or []
    rules = all_rules()
    for a in archs:
        if a in rules:
            return rules[a]
    raise UnsupportedArchitectureError(
        f"architecture {', '.join(archs) or '(none given in config.json)'} is not supported by the converter; "
        f"supported: {', '.join(sorted(rules))}",
        hint="open an issue, or add a rule in localllm/archs/ (one small file)", arch=",".join(archs))
