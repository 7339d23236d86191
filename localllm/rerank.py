"""Reranking: how relevant each document is to a query, scored by a cross-encoder GGUF (pooling
type RANK: bge-reranker, Qwen3-Reranker, ...) on a context of its own, as llama-server's
``/rerank`` scores it (``format_prompt_rerank``: the GGUF's "rerank" template, else
``[BOS] query [EOS] [SEP] document [EOS]`` as the vocabulary adds them; the score is the
classifier's first output).

Example:
    >>> r = Reranker(llama_model, prompter, n_ctx=512, n_threads=2)            # doctest: +SKIP
    >>> scores, n_tokens = r.scores("what is a cat?", ["a cat is an animal", "rust is a language"])  # doctest: +SKIP
    >>> ranked([0.1, 2.5, -1.0], top_n=2)
    [1, 0]
"""

from __future__ import annotations

from collections.abc import Sequence

from localllm import runtime
from localllm.errors import ContextOverflowError, InvalidArgumentError
from localllm.prompting import Prompter


def ranked(scores: Sequence[float], top_n: int | None = None) -> list[int]:
    """Indices of ``scores``, best first (ties keep their order), at most ``top_n``."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    return order if top_n is None else order[:top_n]


class Reranker:
    """Lazily creates its context (embeddings, pooling RANK) on first use. Not thread-safe."""

    def __init__(self, model: runtime.LlamaModel, prompter: Prompter, *, n_ctx: int, n_threads: int) -> None:
        if not model.is_reranker:
            raise InvalidArgumentError(
                "this model is not a reranker (its GGUF's pooling type is not RANK): reranking needs a "
                "cross-encoder GGUF such as bge-reranker or Qwen3-Reranker", param="model")
        self.model = model
        self.prompter = prompter
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.template = model.chat_template("rerank")
        self._ctx: runtime.Context | None = None

    def prompt_ids(self, query: str, document: str) -> list[int]:
        """One (query, document) pair as the model reads it."""
        m, tok = self.model, self.prompter.tokenize
        if self.template is not None:
            text = self.template.replace("{query}", query).replace("{document}", document)
            return tok(text, add_special=False, special=True)
        end = m.eos if m.eos >= 0 else m.sep
        ids = [m.bos] if m.add_bos else []
        ids += tok(query, add_special=False, special=False)
        ids += [end] if m.add_eos else []
        ids += [m.sep] if m.add_sep else []
        ids += tok(document, add_special=False, special=False)
        return ids + ([end] if m.add_eos else [])

    def scores(self, query: str, documents: Sequence[str]) -> tuple[list[float], int]:
        """Each document's relevance score and the number of tokens read."""
        if self._ctx is None:
            n = self.n_ctx  # a pair is pooled in one micro-batch
            self._ctx = runtime.Context(self.model, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                        embeddings=True, pooling="rank")
        ctx = self._ctx
        batch = runtime.Batch(ctx.n_batch)
        out: list[float] = []
        total = 0
        try:
            for i, doc in enumerate(documents):
                ids = self.prompt_ids(query, doc) or [max(self.model.bos, 0)]
                if len(ids) > ctx.n_ctx:
                    raise ContextOverflowError(f"the query with documents[{i}] is {len(ids)} tokens but the "
                                               f"reranker takes at most {ctx.n_ctx}", param="documents",
                                               prompt_tokens=len(ids), n_ctx=ctx.n_ctx)
                total += len(ids)
                ctx.clear()
                batch.clear()
                for j, t in enumerate(ids):
                    batch.add(t, j, 0, True)
                ctx.decode(batch)
                out.append(float(ctx.scores(0)[0]))
        finally:
            batch.close()
        return out, total

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
