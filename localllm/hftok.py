"""Exact Hugging Face tokenization for GGUFs that embed their original
``tokenizer.json`` (key ``tokenizer.huggingface.json``), via the
``tokenizers`` package (a core dependency). Special tokens behave as on llama.cpp's path:
``special=True`` parses special-token text, BOS/EOS are added per the GGUF.

Example:
    >>> t = HFTokenizer(json_text, bos=1, eos=2, add_bos=True, add_eos=False)   # doctest: +SKIP
    >>> t.encode("Hello", add_special=True, special=False)                      # doctest: +SKIP
    [1, 15043]
"""

from __future__ import annotations

import threading


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with llama.cpp's add_bos/add_eos and special semantics."""

    def __init__(self, json_text: str | None, *, bos: int, eos: int, add_bos: bool, add_eos: bool,
                 tokenizer=None) -> None:
        from tokenizers import Tokenizer

        self._tok = tokenizer if tokenizer is not None else Tokenizer.from_str(json_text)
        self._lock = threading.Lock()  # encode_special_tokens is a flag on the shared object
        self.bos, self.eos, self.add_bos, self.add_eos = bos, eos, add_bos, add_eos

    def encode(self, text: str, *, add_special: bool, special: bool) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not special
            try:
                ids = list(self._tok.encode(text, add_special_tokens=False).ids)
            finally:
                self._tok.encode_special_tokens = False
        if add_special and self.add_bos and self.bos >= 0:
            ids.insert(0, self.bos)
        if add_special and self.add_eos and self.eos >= 0:
            ids.append(self.eos)
        return ids


def from_metadata(metadata: dict, *, bos: int, eos: int, add_bos: bool, add_eos: bool) -> HFTokenizer | None:
    """The embedded HF tokenizer of a GGUF (its header ``metadata``), or None when
    the key is absent or the JSON is one this ``tokenizers`` cannot read."""
    text = metadata.get("tokenizer.huggingface.json")
    if not isinstance(text, str) or not text:
        return None
    try:
        return HFTokenizer(text, bos=bos, eos=eos, add_bos=add_bos, add_eos=add_eos)
    except Exception:  # a tokenizer.json this tokenizers version cannot read: keep llama.cpp's path
        return None
