"""Tokenizers → GGUF vocabulary: SentencePiece (``tokenizer.model`` or a
SentencePiece-style ``tokenizer.json``) and byte-level BPE.

The BPE pre-tokenizer name is chosen from what ``tokenizer.json`` declares
(its split regexes, digit splitting and byte-level flags), not from a hash of
token ids, and anything llama.cpp cannot reproduce is reported in ``notes``.
The original ``tokenizer.json`` is embedded under ``tokenizer.huggingface.json``
so :class:`localllm.Model` can tokenize exactly as HF does.

Example:
    >>> v = load_vocab(Path("hf-model"), n_rows=49152)      # doctest: +SKIP
    >>> v.model, v.pre                                          # doctest: +SKIP
    ('gpt2', 'smollm')
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from localllm.converter.checkpoint import read_json
from localllm.errors import CheckpointError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# what a tokenizer.json pre_tokenizer declares → llama.cpp's pre-tokenizer of the same regexes
# (see llm_tokenizer_bpe in llama.cpp's llama-vocab.cpp)
PRE_TOKENIZERS: dict[tuple, str] = {
    (("Split", _LLAMA3_RE), ("ByteLevel", False)): "llama-bpe",
    (("Split", _QWEN2_RE), ("ByteLevel", False)): "qwen2",
    (("Split", _QWEN35_RE), ("ByteLevel", False)): "qwen35",
    (("Digits", True), ("ByteLevel", True)): "smollm",
    (("ByteLevel", True),): "gpt-2",
}


@dataclass
class Vocab:
    """A tokenizer ready to write into GGUF."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    hf_json: str | None = None
    notes: list[str] = field(default_factory=list)


def _pre_signature(pt: dict[str, Any] | None) -> tuple:
    if not pt:
        return ()
    parts = pt.get("pretokenizers") if pt.get("type") == "Sequence" else [pt]
    sig = []
    for p in parts or []:
        t = p.get("type")
        if t == "Split":
            pat = p.get("pattern", {})
            sig.append(("Split", pat.get("Regex") or pat.get("String")))
        elif t == "ByteLevel":
            sig.append(("ByteLevel", bool(p.get("use_regex", True))))
        elif t == "Digits":
            sig.append(("Digits", bool(p.get("individual_digits"))))
        else:
            sig.append((t,))
    return tuple(sig)


def detect_pre(tj: dict[str, Any]) -> tuple[str | None, list[str]]:
    """llama.cpp's pre-tokenizer name for a byte-level BPE ``tokenizer.json``,
    and notes on what llama.cpp will not reproduce.

    Example:
        >>> detect_pre({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}})
        ('gpt-2', [])
    """
    notes: list[str] = []
    sig = _pre_signature(tj.get("pre_tokenizer"))
    name = PRE_TOKENIZERS.get(sig)
    if name is None:
        notes.append(f"pre-tokenizer not recognized ({sig}); llama.cpp's own tokenizer will use "
                     f"'default' and may split text differently (the embedded HF tokenizer is exact)")
    norm = tj.get("normalizer")
    if norm and not (name == "qwen2" and norm.get("type") == "NFC"):
        notes.append(f"normalizer {norm.get('type')} is not applied by llama.cpp's tokenizer")
    return name, notes


def _special_flags(tj: dict[str, Any] | None, tcfg: dict[str, Any]) -> tuple[bool | None, bool | None]:
    """add_bos/add_eos as tokenizer_config.json says, else as the post-processor does."""
    bos, eos = tcfg.get("add_bos_token"), tcfg.get("add_eos_token")
    pp = (tj or {}).get("post_processor") or {}
    procs = pp.get("processors", [pp]) if pp.get("type") == "Sequence" else [pp]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if bos is None:
                bos = bool(single) and "SpecialToken" in single[0]
            if eos is None:
                eos = len(single) > 1 and "SpecialToken" in single[-1]
    return bos, eos


def _added(tj: dict[str, Any]) -> dict[int, tuple[str, bool]]:
    return {int(a["id"]): (a["content"], bool(a.get("special"))) for a in tj.get("added_tokens", [])}


def _from_tokenizer_json(tj: dict[str, Any], path: Path, scores_from: int = 0) -> Vocab:
    """``scores_from``: SentencePiece-style scores are only needed from this id
    on (tokenizer.model supplies the others); Gemma-3 has 514k merges, and
    ranking them all costs ~200 MB for nothing."""
    model = tj.get("model") or {}
    mtype = model.get("type")
    added = _added(tj)
    unk = model.get("unk_token")
    if mtype == "Unigram":
        pieces = model["vocab"]
        tokens = [p[0] for p in pieces]
        scores = [float(p[1]) for p in pieces]
        kind = "llama"
    elif mtype == "BPE":
        vocab = model["vocab"]
        size = max(list(vocab.values()) + list(added)) + 1
        tokens = [""] * size
        for tok, i in vocab.items():
            tokens[i] = tok
        raw_merges = model.get("merges", [])
        byte_level = "ByteLevel" in json.dumps(tj.get("decoder"))
        kind = "gpt2" if byte_level and not model.get("byte_fallback") else "llama"
        merges = [m if isinstance(m, str) else " ".join(m) for m in raw_merges] if kind == "gpt2" else []
        if kind == "llama":
            # SentencePiece merges by highest score; HF BPE by lowest merge rank
            # (ranked only for the tokens that need a score)
            need = set(tokens[scores_from:])
            rank: dict[str, int] = {}
            for r, m in enumerate(raw_merges):
                joined = m.replace(" ", "") if isinstance(m, str) else "".join(m)
                if joined in need:
                    rank.setdefault(joined, r)
            n_merges = len(raw_merges)
            scores = [0.0] * min(scores_from, len(tokens)) + [
                -float(rank.get(t, 0 if len(t) <= 1 else n_merges)) for t in tokens[scores_from:]]
    else:
        raise CheckpointError(f"{path}: tokenizer model type {mtype!r} is not supported "
                              f"(SentencePiece/Unigram and BPE are)", path=str(path))
    for i, (content, _) in added.items():
        if i >= len(tokens):
            tokens.extend([""] * (i + 1 - len(tokens)))
        tokens[i] = content
    types = []
    for i, t in enumerate(tokens):
        if i in added:
            types.append(CONTROL if added[i][1] else USER_DEFINED)
        elif t == unk:
            types.append(UNKNOWN)
        elif kind == "llama" and len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            types.append(BYTE)
        elif t == "":
            types.append(UNUSED)
        else:
            types.append(NORMAL)
    for i, t in enumerate(tokens):
        if t == "":
            tokens[i] = f"[PAD{i}]"  # holes in the id space
    if kind == "gpt2":
        pre, notes = detect_pre(tj)
        return Vocab("gpt2", tokens, types, merges=merges, pre=pre or "default", notes=notes)
    v = Vocab("llama", tokens, types, scores=scores, pre="default")
    js = json.dumps(tj.get("normalizer")) + json.dumps(tj.get("pre_tokenizer"))
    v.add_space_prefix = "Prepend" in js or '"prepend_scheme": "always"' in js or '"prepend_scheme": "first"' in js
    return v


def _from_sentencepiece(path: Path) -> Vocab:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i) else
                     UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    return Vocab("llama", tokens, types, scores=scores, pre="default")


def load_vocab(root: Path, *, n_rows: int, trim: bool = False, add_space_prefix: bool | None = None) -> Vocab:
    """Read the tokenizer of a HF folder; pad it to ``n_rows`` (the embedding's
    rows) with unused tokens, or keep it shorter when ``trim``."""
    tj_path, sp_path = root / "tokenizer.json", root / "tokenizer.model"
    tj = read_json(tj_path) if tj_path.exists() else None
    tcfg_path = root / "tokenizer_config.json"
    tcfg = read_json(tcfg_path) if tcfg_path.exists() else {}
    if tj is not None:
        sp = _try_sentencepiece(sp_path) if sp_path.exists() else None
        v = _from_tokenizer_json(tj, tj_path, scores_from=len(sp.tokens) if sp is not None else 0)
        if v.model == "llama" and sp is not None:
            # tokenizer.model is SentencePiece's own truth for scores and types
            n = len(sp.tokens)
            v.tokens[:n], v.types[:n] = sp.tokens, sp.types
            v.scores[:n] = sp.scores  # type: ignore[index]
            for i, (_, special) in _added(tj).items():  # tokenizer.json knows which are special
                v.types[i] = CONTROL if special else USER_DEFINED
        v.hf_json = tj_path.read_text(encoding="utf-8")
    elif sp_path.exists():
        v = _from_sentencepiece(sp_path)
        for i, (content, special) in ((int(k_), (c, True)) for c, k_ in
                                      (read_json(root / "added_tokens.json").items()
                                       if (root / "added_tokens.json").exists() else [])):
            while len(v.tokens) <= i:
                v.tokens.append(f"[PAD{len(v.tokens)}]"); v.types.append(UNUSED); v.scores.append(0.0)  # type: ignore[union-attr]
            v.tokens[i], v.types[i] = content, CONTROL
    else:
        raise CheckpointError(f"{root}: no tokenizer.json or tokenizer.model", path=str(root),
                              hint="download the tokenizer files with the weights")
    bos, eos = _special_flags(tj, tcfg)
    v.add_bos = bool(bos) if bos is not None else v.model == "llama"
    v.add_eos = bool(eos)
    if v.model == "llama":
        # what tokenizer.json declares wins; the rule's default covers tokenizer.model alone
        if v.add_space_prefix is None:
            v.add_space_prefix = add_space_prefix if add_space_prefix is not None else True
    if len(v.tokens) > n_rows and not trim:
        raise CheckpointError(f"{root}: the tokenizer has {len(v.tokens)} tokens but the embedding only "
                              f"{n_rows} rows", path=str(root))
    if trim:
        del v.tokens[n_rows:], v.types[n_rows:]
        if v.scores:
            del v.scores[n_rows:]
    while len(v.tokens) < n_rows:  # the config's vocab_size often rounds up
        v.tokens.append(f"[PAD{len(v.tokens)}]")
        v.types.append(UNUSED)
        if v.scores is not None:
            v.scores.append(-1e9)
    return v


def _try_sentencepiece(path: Path) -> Vocab | None:
    try:
        return _from_sentencepiece(path)
    except ImportError:
        return None


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Drop a library logger's warnings for the block (errors still pass)."""
    log = logging.getLogger(logger_name)
    before = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(before)


def write_vocab(w: gguf.GGUFWriter, v: Vocab, root: Path) -> None:
    """Write tokens, types, scores/merges, special ids, flags and chat template."""
    w.add_tokenizer_model(v.model)
    w.add_tokenizer_pre(v.pre or "default")
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    if v.scores is not None:
        w.add_token_scores(v.scores)
    if v.merges:
        w.add_token_merges(v.merges)
    # gguf's reading of the post-processor logs warnings to stderr (Llama-3's pair template: "Unknown
    # separator token"): it only decides add_special_token, which is discarded just below
    with _quiet("gguf.vocab"):
        sv = gguf.SpecialVocab(root, load_merges=False, n_vocab=len(v.tokens))
    sv.add_special_token = {}  # written explicitly below, from one decision
    sv.add_to_gguf(w, quiet=True)
    w.add_add_bos_token(v.add_bos)
    w.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        w.add_add_space_prefix(v.add_space_prefix)
    if v.hf_json is not None:
        w.add_string(gguf.Keys.Tokenizer.HF_JSON, v.hf_json)
