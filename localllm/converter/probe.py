"""The tokenizer probe: tokenize a built-in multi-script corpus with HF's
``tokenizers`` and with the GGUF through llama.cpp, and list every difference.

Example:
    >>> r = probe_gguf(Path("out.gguf"), hf_json)            # doctest: +SKIP
    >>> r.llama_cpp_mismatches, r.cases                          # doctest: +SKIP
    (1, 96)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# Several scripts, digits of several scripts, code, emoji, whitespace runs and
# special-token text; each line is one case (and the special-token cases are
# checked with special parsing both on and off).
CORPUS: tuple[str, ...] = (
    "Hello world", " Hello world", "Hello  world", "hello, World! How's it going? I'm fine, you'll see.",
    "The quick brown fox jumps over the lazy dog.", "IT'S ALL CAPS AND 'QUOTED' TEXT",
    "1234567890", " 123 4567 89", "3.14159 2,718 1e-9 0x1F", "٠١٢٣٤٥٦٧٨٩", " ٤٥٦", "०१२३४५६७८९", "一二三 四五六",
    "Привет, мир! Как дела?", "Ελληνικά γράμματα", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
    "こんにちは世界", "你好，世界！今天天气很好。", "안녕하세요 세계", "สวัสดีชาวโลก", "Tiếng Việt có dấu",
    "Zürich Straße Ærø naïve café", "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "   leading spaces", "trailing spaces   ", "tabs\tand\ttabs", "new\nlines\n\nand\r\nCRLF",
    "\n\n\n", "    ", " ", "", "a" * 40, "x = [i ** 2 for i in range(10)]  # squares",
    "def f(a, b):\n    return a + b\n", "if (x != y && z >= 3) { printf(\"%d\\n\", x); }",
    "<html><body class=\"x\">Hi</body></html>", "https://example.com/path?q=1&r=2#frag",
    "user@example.com", "$PATH ~/bin ../up ./here", "¡¿Qué?! «guillemets» „Anführung“ —dash– …",
    "∀x∈ℝ: x² ≥ 0", "<s>", "</s>", "<|im_start|>user\nhi<|im_end|>", "<bos><start_of_turn>user\nhi<end_of_turn>",
    "<|endoftext|>", "[INST] hi [/INST]", "<unk>", "<pad>",
)


@dataclass
class ProbeResult:
    """Differences between HF and llama.cpp tokenization, per case."""

    cases: int = 0
    llama_cpp_mismatches: int = 0
    hf_path_mismatches: int = 0
    diffs: list[tuple[str, bool, list[int], list[int]]] = field(default_factory=list)  # text, special, hf, llama.cpp
    skipped: str | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.llama_cpp_mismatches == 0

    def lines(self, limit: int = 50) -> list[str]:
        """Human-readable differences (the string, then what each side produced)."""
        out = []
        for text, special, hf, ll in self.diffs[:limit]:
            out.append(f"{text!r} (special={'on' if special else 'off'}): HF {hf} vs llama.cpp {ll}")
        if len(self.diffs) > limit:
            out.append(f"... and {len(self.diffs) - limit} more")
        return out


def hf_encode(tok, text: str, *, special: bool) -> list[int]:
    """Encode with a ``tokenizers.Tokenizer``; ``special=False`` treats
    special-token text as plain text, like llama.cpp's ``parse_special=False``."""
    tok.encode_special_tokens = not special
    try:
        return list(tok.encode(text, add_special_tokens=False).ids)
    finally:
        tok.encode_special_tokens = False


def skip_reason(hf_json: str | None) -> str | None:
    """Why the probe cannot run (known before writing), or None when it can.

    Example:
        >>> skip_reason(None)
        'no tokenizer.json to compare against'
    """
    if hf_json is None:
        return "no tokenizer.json to compare against"
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return "the tokenizers package is not installed"
    return None


def probe_gguf(path: Path, hf_json: str | None, corpus: tuple[str, ...] = CORPUS) -> ProbeResult:
    """Tokenize ``corpus`` with HF (from ``hf_json``) and with llama.cpp (vocab of
    ``path``, loaded vocab-only) and record every difference; also check that
    :class:`localllm.Model`'s HF path (the ``tokenizer.json`` embedded in the written
    file) reproduces HF exactly."""
    reason = skip_reason(hf_json)
    if reason is not None:
        return ProbeResult(skipped=reason)
    from tokenizers import Tokenizer
    from localllm import runtime
    from localllm.hftok import from_metadata
    from localllm.validate import read_header

    tok = Tokenizer.from_str(hf_json)
    m = runtime.LlamaModel(path, vocab_only=True)
    try:
        # the HF path as Model will run it: from the JSON embedded in the written file, not
        # from the tokenizer we compare against (that comparison could never differ)
        ours = from_metadata(read_header(path).metadata, bos=m.bos, eos=m.eos, add_bos=m.add_bos,
                             add_eos=m.add_eos)
        res = ProbeResult()
        for text in corpus:
            for special in (True, False):
                res.cases += 1
                ref = hf_encode(tok, text, special=special)
                ll = list(m.tokenize(text, add_special=False, parse_special=special))
                if ref != ll:
                    res.llama_cpp_mismatches += 1
                    res.diffs.append((text, special, ref, ll))
                if ours is None or ours.encode(text, add_special=False, special=special) != ref:
                    res.hf_path_mismatches += 1
        return res
    finally:
        m.close()
