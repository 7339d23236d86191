"""localllm: a CPU-first local LLM runtime on llama.cpp.

Example:
    >>> from localllm import Model
    >>> Model().generate("Hi", max_tokens=8)          # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from localllm.errors import LocalLLMError

__version__ = "0.1.0"
__all__ = ["Model", "LocalLLMError", "__version__"]

if TYPE_CHECKING:
    from localllm.model import Model


def __getattr__(name: str):
    # Model pulls in llama.cpp (a shared library); load it only when asked,
    # so `localllm --version` and the CLI's help stay instant.
    if name == "Model":
        from localllm.model import Model

        return Model
    raise AttributeError(name)
