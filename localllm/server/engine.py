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
from localllm.errors import ContextOverflowError, InvalidArgumentError

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
        n_ctx = cfg.ctx or min(m.n_ctx_train or 4096, 4096)
        if m.n_ctx_train and n_ctx > m.n_ctx_train:
            raise InvalidArgumentError(f"--ctx {n_ctx} is larger than the {m.n_ctx_train} tokens this model "
                                       f"was trained on", param="ctx")
        self.n_ctx = n_ctx
        self.n_threads = cfg.threads or settings.default_threads()
        meta = m.meta()
        template = m.chat_template()
        if template is None:  # same fallback as Model: a built-in template that fits the vocabulary
            _, template = chatmod.guess_template(
                lambda t: len(m.tokenize(t, add_special=False, parse_special=True)) == 1)
        self.template = template
        self.bos_text = m.token_text(m.bos) if m.bos >= 0 else ""
        self.eos_text = m.token_text(m.eos) if m.eos >= 0 else ""
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
        self._emb_ctx: Any = None
        self._emb_lock = threading.Lock()

    # ------------------------------------------------------------------ prompts
    def serves(self, name: str) -> bool:
        return name in self.aliases

    def chat_prompt(self, messages: Any) -> list[int]:
        """OpenAI messages → token ids through the model's own template (sandboxed)."""
        msgs = chatmod.normalize_messages(messages)
        text = chatmod.render_chat(self.template, msgs, bos_token=self.bos_text, eos_token=self.eos_text,
                                   add_generation_prompt=True)
        # templates usually write the BOS themselves; don't add a second one
        add_bos = self.model.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.model.tokenize(text, add_special=add_bos, parse_special=True)

    def text_prompt(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, list):
            return prompt
        return self.model.tokenize(prompt, add_special=self.model.add_bos, parse_special=False)

    # ------------------------------------------------------------------ embeddings
    def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Mean-pooled, L2-normalised embeddings and the token count. Runs in the
        caller's thread on its own context (the model's weights are shared, read-only)."""
        rt, m = self._rt, self.model
        out: list[list[float]] = []
        total = 0
        with self._emb_lock:
            if self._emb_ctx is None:
                n = min(self.n_ctx, 2048)
                # mean pooling needs a whole input in one micro-batch
                self._emb_ctx = rt.Context(m, n_ctx=n, n_batch=n, n_ubatch=n, n_threads=self.n_threads,
                                           embeddings=True)
            ctx = self._emb_ctx
            batch = rt.Batch(ctx.n_batch)
            try:
                for i, t in enumerate(texts):
                    ids = m.tokenize(t, add_special=True, parse_special=False) or [max(m.bos, 0)]
                    if len(ids) > ctx.n_ctx:
                        raise ContextOverflowError(f"input[{i}] is {len(ids)} tokens but embeddings take at "
                                                   f"most {ctx.n_ctx}", param="input")
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
        self.scheduler.close()
        with self._emb_lock:
            if self._emb_ctx is not None:
                self._emb_ctx.close()
                self._emb_ctx = None
        self.model.close()
