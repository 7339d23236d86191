"""An independent reference for the generation core: llama.cpp's own logits, from
llama-cpp-python's high-level ``Llama`` (not our runtime), and the arithmetic redone in numpy.
Used by core/test_sampling.py and core/test_beams.py (the ``ref`` fixture is in core/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


class Reference:
    """Logits of any token sequence, from llama-cpp-python's high-level ``Llama``."""

    def __init__(self, path: Path, n_ctx: int) -> None:
        import llama_cpp
        import llama_cpp.llama_cpp as C

        from localllm import runtime

        # the weights in the same buffers as our runtime's: without extra buffer types where the build
        # has AMX, whose buffers crash on batches of 2+ tokens (runtime._lib.extra_buffers_usable);
        # Llama() has no such option, so its default parameters are amended while it loads
        defaults = C.llama_model_default_params

        def params() -> C.llama_model_params:
            p = defaults()
            p.use_extra_bufts = p.use_extra_bufts and runtime.extra_buffers_usable()
            return p

        C.llama_model_default_params = params
        try:  # flash attention on, as llama.cpp's "auto" chooses on a CPU (our runtime's setting)
            self.llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=512, n_ubatch=512, n_threads=2,
                                       logits_all=True, flash_attn=True, verbose=False)
        finally:
            C.llama_model_default_params = defaults

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Last-position logits, decoding the prefix shared with the previous call only once."""
        llm = self.llm
        keep = 0
        for a, b in zip(llm.input_ids[:llm.n_tokens], tokens[:-1]):
            if a != b:
                break
            keep += 1
        llm.n_tokens = keep
        llm.eval(tokens[keep:])
        return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)

    def close(self) -> None:
        self.llm.close()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - (x.max() + np.log(np.exp(x - x.max()).sum()))
