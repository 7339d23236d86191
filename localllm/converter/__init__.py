"""Hugging Face checkpoint → GGUF conversion (``localllm convert``).

Modules, by concept: :mod:`.checkpoint` (reading weights and config),
:mod:`.rules` (per-architecture rules, data in ``localllm.archs``),
:mod:`.tensors` (names, layout fixes, types), :mod:`.tokenizer`,
:mod:`.writer` (GGUF writing, quant types), :mod:`.probe` (tokenizer probe),
:mod:`.verify` (logits against transformers), :mod:`.pipeline` (``convert``).

Example:
    >>> from localllm.converter import convert
    >>> convert("hf-model", "model.gguf", quant="Q8_0")          # doctest: +SKIP
"""

from localllm.converter.pipeline import ConvertResult, convert
from localllm.formats import DEFAULT_QUANT, QUANTS

__all__ = ["ConvertResult", "convert", "DEFAULT_QUANT", "QUANTS"]
