"""How text and conversations become a model's token ids: one place for the
tokenizer choice and the chat template, shared by ``Model`` and the server so
both tokenize identically.

- Tokenizer: the GGUF's embedded Hugging Face ``tokenizer.json`` when present
  and the ``tokenizers`` package is installed (exact HF ids), else llama.cpp's.
- Chat template: the GGUF's own, else a built-in one chosen from the special
  tokens the vocabulary really has; rendered in a Jinja2 sandbox.

Example:
    >>> p = Prompter(llama_model, header.metadata)                       # doctest: +SKIP
    >>> p.chat_ids([{"role": "user", "content": "Hi"}])                  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from localllm import chat as chatmod
from localllm import hftok, runtime
from localllm.errors import InvalidArgumentError


class Prompter:
    def __init__(self, model: runtime.LlamaModel, metadata: dict[str, Any]) -> None:
        self.model = model
        self.hf = hftok.from_metadata(metadata, bos=model.bos, eos=model.eos, add_bos=model.add_bos,
                                      add_eos=model.add_eos)
        self.tokenizer_source = "huggingface" if self.hf is not None else "llama.cpp"
        self.template = model.chat_template()
        self.template_source = "gguf"
        if self.template is None:
            name, self.template = chatmod.guess_template(
                lambda t: len(model.tokenize(t, add_special=False, parse_special=True)) == 1)
            self.template_source = f"built-in {name} (the GGUF has no chat template)"
        self.bos_text = model.token_text(model.bos) if model.bos >= 0 else ""
        self.eos_text = model.token_text(model.eos) if model.eos >= 0 else ""

    def tokenize(self, text: str, *, add_special: bool, special: bool) -> list[int]:
        if self.hf is not None:
            return self.hf.encode(text, add_special=add_special, special=special)
        return self.model.tokenize(text, add_special=add_special, parse_special=special)

    def text_ids(self, prompt: str) -> list[int]:
        """A raw prompt (no template): BOS per the GGUF, special-token text kept literal."""
        if not isinstance(prompt, str):
            raise InvalidArgumentError("prompt must be a string", param="prompt")
        ids = self.tokenize(prompt, add_special=self.model.add_bos, special=False)
        if not ids:
            raise InvalidArgumentError("the prompt is empty", param="prompt")
        return ids

    def render(self, messages: Any, *, add_generation_prompt: bool = True, **extra: Any) -> str:
        return chatmod.render_chat(self.template, messages, bos_token=self.bos_text, eos_token=self.eos_text,
                                   add_generation_prompt=add_generation_prompt, **extra)

    def chat_ids(self, messages: Any, **extra: Any) -> list[int]:
        """Render ``messages`` with the template (``extra``: variables such as ``tools``) and tokenize,
        parsing special tokens."""
        text = self.render(messages, **extra)
        # templates usually write the BOS themselves; don't add a second one
        add_bos = self.model.add_bos and not (self.bos_text and text.startswith(self.bos_text))
        return self.tokenize(text, add_special=add_bos, special=True)
