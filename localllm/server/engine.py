"""The served model: loading, prompts (chat template, tokens), embeddings, and
the scheduler that generates.

Example:
    >>> eng = Engine(ServerSettings(parallel=2, ctx=1024))      # doctest: +SKIP
    >>> eng.chat_prompt([{"role": "user", "content": "Hi"}])[:3]  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from localllm import chat as chatmod
from localllm import settings

log = logging.getLogger("localllm.server")


@dataclass(frozen=True)
class ServerSettings:
    """Everything ``localllm serve`` can be told. ``ctx`` is per sequence."""

    model: str | None = None
    models_dir: str | None = None
    host: str = "127.0.0.1"
    port: int = 7860
    api_key: str | None = None
    parallel: int = 4
    ctx: int | None = None
    max_queue: int = 16
    threads: int | None = None
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 4 << 20
    model_alias: str | None = None
    load_async: bool = True  # /health answers 503 while the model loads
    # llama.cpp's repacked weights (its default; much faster Q4_0/Q4_K on AVX2) run
    # another kernel for 4+ rows than for 1; with one KV stream per slot no greedy
    # output changed in a batch in benchmarks/batch_invariance.py, so it stays on
    repack: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Engine:
    """A loaded model plus its scheduler. Construct in any thread; ``close()`` frees it."""

    def __init__(self, cfg: ServerSettings, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
        from localllm import runtime, store, validate
        from localllm.server.scheduler import Scheduler

        self._rt = runtime
        path: Path = store.resolve(cfg.model, models_dir=cfg.models_dir)
        header = validate.read_header(path)  # llama.cpp never sees a file that fails the bounded check
        self.path = path
        self.model = runtime.LlamaModel(path, use_extra_bufts=cfg.repack)
        m = self.model
        from localllm.plan import context_size

        n_ctx = context_size(cfg.ctx, m.n_ctx_train, param="--ctx")
        self.n_ctx = n_ctx
        self.n_threads = cfg.threads or settings.default_threads()
        meta = m.meta()
        from localllm.prompting import Prompter

        self.prompter = Prompter(m, header.metadata)  # the same tokenizer and template as Model
        if (path.parent / "manifest.json").is_file():  # in the store: NAME:VERSION
            self.model_id = f"{path.parent.parent.name}:{path.parent.name}"
        else:
            self.model_id = path.stem
        self.model_id = cfg.model_alias or self.model_id
        self.aliases = {self.model_id, self.model_id.split(":")[0], path.stem, path.name, str(path),
                        cfg.model or "", meta.get("general.name", "")} - {""}
        self.info = {"quant": header.quant, "n_ctx": n_ctx,
                     "parallel": cfg.parallel, "n_params": m.n_params, "size": m.size}
        self.scheduler = Scheduler(m, n_slots=cfg.parallel, n_ctx_seq=n_ctx, n_threads=self.n_threads,
                                   max_queue=cfg.max_queue, on_step=on_step)
        from localllm.embeddings import Embedder

        # embeddings run in the caller's thread on a context of their own
        self._embedder = Embedder(self.model, self.prompter, n_ctx=min(self.n_ctx, 2048), n_threads=self.n_threads)
        self._emb_lock = threading.Lock()

    # ------------------------------------------------------------------ prompts
    def serves(self, name: str) -> bool:
        return name in self.aliases

    def chat_prompt(self, messages: Any) -> list[int]:
        """OpenAI messages → token ids through the model's own template (sandboxed)."""
        return self.prompter.chat_ids(chatmod.normalize_messages(messages))

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.prompter.tokenize(prompt, add_special=self.model.add_bos, special=False)

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings and the token count. Runs in the
        caller's thread on its own context (the model's weights are shared, read-only)."""
        with self._emb_lock:
            return self._embedder.embed(texts)

    def close(self) -> None:
        self.scheduler.close()
        with self._emb_lock:
            self._embedder.close()
        self.model.close()
