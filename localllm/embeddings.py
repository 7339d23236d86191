"""Mean-pooled, L2-normalised embeddings from a causal model, on a context of
their own (the weights are shared with the generation context).

Example:
    >>> emb = Embedder(llama_model, prompter, n_ctx=512, n_threads=2)     # doctest: +SKIP
    >>> vectors, n_tokens = emb.embed(["hello", "world"])        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

from localllm import runtime
from localllm.errors import ContextOverflowError
from localllm.prompting import Prompter


class Embedder:
    """Lazily creates its embeddings context on first use. Not thread-safe."""

    def __init__(self, model: runtime.LlamaModel, prompter: Prompter, *, n_ctx: int, n_threads: int) -> None:
        self.model = model
        self.prompter = prompter
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self._ctx: runtime.Context | None = None

    def embed(self, texts: Sequence[str]) -> tuple[list[list[float]], int]:
        """Vectors for ``texts`` and the number of tokens read."""
        m = self.model
        if self._ctx is None:
            n = self.n_ctx
            # mean pooling needs a whole input in one micro-batch
            self._ctx = runtime.Context(m, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                        embeddings=True)
        ctx = self._ctx
        batch = runtime.Batch(ctx.n_batch)
        out: list[list[float]] = []
        total = 0
        try:
            for i, text in enumerate(texts):
                ids = self.prompter.tokenize(text, add_special=True, special=False) or [max(m.bos, 0)]
                if len(ids) > ctx.n_ctx:
                    raise ContextOverflowError(f"input[{i}] is {len(ids)} tokens but embeddings take at most "
                                               f"{ctx.n_ctx}", param="input", prompt_tokens=len(ids), n_ctx=ctx.n_ctx)
                total += len(ids)
                ctx.clear()
                batch.clear()
                for j, tok in enumerate(ids):
                    batch.add(tok, j, 0, True)
                ctx.decode(batch)
                v = ctx.embedding(0)
                norm = float((v * v).sum()) ** 0.5 or 1.0
                out.append((v / norm).tolist())
        finally:
            batch.close()
        return out, total

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
