"""The runtime adapter: the only package that imports ``llama_cpp`` (in
``_lib``; its other modules take the handle from there).

It owns llama.cpp's C objects (models, contexts, batches, samplers), frees
them, and turns llama.cpp failures into :mod:`localllm.errors` exceptions.
Everything above it speaks Python: token ids, bytes, numpy views.

The hot path (one decode + one sample per token) stays in C: sampling runs
through llama.cpp's sampler chain, so no per-token copy of the logits is made
in Python.

Example:
    >>> m = load_model("model.gguf")                     # doctest: +SKIP
    >>> ctx = Context(m, n_ctx=512)                      # doctest: +SKIP
"""

from localllm.runtime._context import KV_CACHE_TYPES, Context
from localllm.runtime._hugepages import thp_mode
from localllm.runtime._hugepages import wanted as hugepages_wanted
from localllm.runtime._lib import (LLAMA_CPP_PYTHON_VERSION, _backend, amx_compiled, backend_devices, cpu_variant,
                                   extra_buffers_usable, gpu_backends, llama_cpp_version, log_tail,
                                   supports_gpu_offload, system_info, time_us)
from localllm.runtime._model import Batch, LlamaModel
from localllm.runtime._quantize import quantize
from localllm.runtime._sampling import Grammar, Sampler, json_grammar, json_schema_to_grammar

__all__ = ["KV_CACHE_TYPES", "Context", "LLAMA_CPP_PYTHON_VERSION", "backend_devices", "cpu_variant", "gpu_backends",
           "llama_cpp_version",
           "log_tail",
           "supports_gpu_offload", "system_info", "time_us", "Batch", "LlamaModel", "quantize", "Grammar", "Sampler",
           "json_grammar", "json_schema_to_grammar", "_backend", "thp_mode", "hugepages_wanted", "amx_compiled",
           "extra_buffers_usable"]
