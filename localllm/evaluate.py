"""Perplexity of a model on a text and, against a reference model, the KL
divergence and top-1 agreement of its next-token distributions.

Chunks are scored as llama-perplexity scores them: the tokenized text is cut
into windows of ``n_ctx`` tokens (the first replaced by BOS where the model
adds one), and only the second half of each window is scored, so every scored
token sees at least ``n_ctx/2`` tokens of context.

The reference's distributions are cached on disk (keyed by the reference's
sha256, the text's sha256 and the context size; the reference always runs
with an f16 KV cache and flash attention auto, so the cache holds those
numbers, and ``cache_type_k``/``cache_type_v``/``flash_attn`` apply to the
model only: the KL of a quantized KV cache). As in llama-perplexity, a
position keeps the reference's tokens with log-probability above
``LOGP_FLOOR`` (-16 nats; the rest carry under 1e-7 each), their
log-probabilities quantized to 16 bits over that range, and the KL sums over
those tokens, with the model's log-probabilities rounded to the same grid (so
a model against itself gives exactly 0). tests/measure/test_eval.py checks the result
against the full KL computed in numpy.

Example:
    >>> r = evaluate("model-q4_0.gguf", reference="model-f16.gguf")        # doctest: +SKIP
    >>> r.perplexity > r.reference_perplexity                                # doctest: +SKIP
    True
    >>> summary_stats(np.array([1.0, 2.0, 3.0]))["mean"]
    2.0
"""

from __future__ import annotations

import hashlib
import importlib.resources
import math
import os
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from localllm.errors import InvalidArgumentError
from localllm.loader import ModelSettings
from localllm.progress import Progress

DEFAULT_CTX = 512
LOGP_FLOOR = -16.0  # reference tokens below this log-probability are left out of the KL (as llama-perplexity)
_Q16 = 65535.0 / -LOGP_FLOOR
_BLOCK = 32         # rows converted to log-probabilities at a time (bounds memory for 256k vocabularies)
_CACHE_VERSION = 2


@dataclass(frozen=True)
class EvalResult:
    """What ``localllm eval`` prints (``--json``: these keys)."""

    model: str
    reference: str | None
    text: str                   # the text's name (a path, or "built-in")
    text_sha256: str
    n_ctx: int
    chunks: int
    tokens: int                 # scored tokens
    perplexity: float
    perplexity_error: float     # one standard error, as llama-perplexity's "±"
    reference_perplexity: float | None
    kl_mean: float | None       # nats per token
    kl_error: float | None
    kl_p99: float | None
    kl_max: float | None
    top1_agreement: float | None    # fraction of positions where both models' most likely token agree
    reference_cached: bool | None   # the reference's distributions came from the disk cache
    seconds: float
    cache_type_k: str = "f16"   # the model's KV cache types and flash attention (the reference: f16, auto)
    cache_type_v: str = "f16"
    flash_attn: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_text() -> str:
    """The evaluation text shipped with the package (English, code, French;
    public domain, see ``localllm/data/README.md``)."""
    return importlib.resources.files("localllm").joinpath("data/eval.txt").read_text(encoding="utf-8")


def summary_stats(values: np.ndarray) -> dict[str, float]:
    """Mean with its standard error, 99th percentile and maximum (llama-perplexity's definitions)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(v.mean())
    var = float((v * v).mean() - mean * mean)
    err = math.sqrt(max(var, 0.0) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "error": err, "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


# --------------------------------------------------------------------------- scoring

class _Scorer:
    """One loaded model that yields, chunk by chunk, the logits of the scored rows."""

    def __init__(self, settings: ModelSettings) -> None:
        from localllm import loader, runtime

        n_ctx = int(settings.n_ctx or DEFAULT_CTX)
        self.loaded = loader.load(settings)
        try:
            self.ctx = runtime.Context(self.loaded.llama, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=min(n_ctx, 512),
                                       n_threads=self.loaded.info.threads, **settings.context_options())
            self.batch = runtime.Batch(n_ctx)
        except BaseException:
            self.loaded.close()
            raise
        self.path = self.loaded.path
        self.n_ctx = n_ctx

    def tokens(self, text: str) -> list[int]:
        return self.loaded.prompter.tokenize(text, add_special=True, special=False)

    def chunks(self, tokens: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Per chunk: (logits of the scored rows [n, vocab], the tokens they predict [n])."""
        n_ctx, first = self.n_ctx, self.n_ctx // 2
        llama = self.loaded.llama
        for c in range(len(tokens) // n_ctx):
            window = list(tokens[c * n_ctx:(c + 1) * n_ctx])
            if llama.add_bos and llama.bos >= 0:
                window[0] = llama.bos
            self.ctx.clear()
            self.batch.clear()
            for pos, tok in enumerate(window):
                self.batch.add(tok, pos, 0, pos >= first)
            self.ctx.decode(self.batch)
            rows = np.stack([self.ctx.logits(i) for i in range(first, n_ctx - 1)])
            yield rows, np.asarray(tokens[c * n_ctx + first + 1:(c + 1) * n_ctx], dtype=np.int64)

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
        self.loaded.close()


@dataclass
class _Reference:
    tokens: np.ndarray      # the whole tokenized text
    offsets: np.ndarray     # [positions + 1] row r's kept tokens are ids[offsets[r]:offsets[r+1]]
    ids: np.ndarray         # kept tokens (log-probability above LOGP_FLOOR), row after row
    logq: np.ndarray        # their log-probabilities, uint16 over [LOGP_FLOOR, 0]
    top: np.ndarray         # [positions] the reference's most likely token
    nll: np.ndarray         # [positions] negative log-likelihood of the true next token

    def rows(self, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(row index per kept token relative to r0, token ids, log-probabilities) of rows r0..r1-1."""
        a, b = int(self.offsets[r0]), int(self.offsets[r1])
        counts = np.diff(self.offsets[r0:r1 + 1])
        row = np.repeat(np.arange(r1 - r0), counts)
        return row, self.ids[a:b].astype(np.int64), self.logq[a:b].astype(np.float64) / _Q16 + LOGP_FLOOR


def _reference_rows(logits: np.ndarray, targets: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(kept tokens per row, their ids, quantized log-probabilities, argmax, nll) of a block of rows."""
    lp = _log_softmax(logits)
    keep = lp > LOGP_FLOOR
    rows, ids = np.nonzero(keep)
    q = np.rint((lp[rows, ids] - LOGP_FLOOR) * _Q16).clip(0, 65535).astype(np.uint16)
    return (keep.sum(axis=1), ids.astype(np.int32), q, lp.argmax(axis=1).astype(np.int32),
            -lp[np.arange(len(targets)), targets])


def _kl_rows(logits: np.ndarray, ref: _Reference, r0: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(KL(reference ‖ model) per row, the model's log-softmax, top-1 agreement) of a block starting at row r0."""
    lq_all = _log_softmax(logits)
    n = len(lq_all)
    row, ids, lp = ref.rows(r0, r0 + n)
    # the model's log-probabilities on the reference's 16-bit grid: the storage's rounding cancels, so a
    # model scored against itself (same file, same KV types) gives exactly 0
    lq = np.rint((lq_all[row, ids] - LOGP_FLOOR) * _Q16) / _Q16 + LOGP_FLOOR
    terms = np.exp(lp) * (lp - lq)
    kl = np.bincount(row, weights=terms, minlength=n)
    agree = lq_all.argmax(axis=1) == ref.top[r0:r0 + n]
    return kl, lq_all, agree


def _score_reference(scorer: _Scorer, tokens: list[int], progress: Progress | None, n_chunks: int) -> _Reference:
    counts, ids, logq, top, nll = [], [], [], [], []
    for c, (logits, targets) in enumerate(scorer.chunks(tokens)):
        for b in range(0, len(targets), _BLOCK):
            k, i, q, t, n = _reference_rows(logits[b:b + _BLOCK], targets[b:b + _BLOCK])
            for lst, v in ((counts, k), (ids, i), (logq, q), (top, t), (nll, n)):
                lst.append(v)
        if progress:
            progress(c + 1, n_chunks, "reference")
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return _Reference(np.asarray(tokens, dtype=np.int32), offsets, np.concatenate(ids), np.concatenate(logq),
                      np.concatenate(top), np.concatenate(nll))


# --------------------------------------------------------------------------- the disk cache

def _cache_file(ref_sha: str, text_sha: str, n_ctx: int) -> Path:
    from localllm import settings

    return settings.cache_dir() / "eval" / f"{ref_sha[:20]}-{text_sha[:20]}-c{n_ctx}-v{_CACHE_VERSION}.npz"


def _load_cached(path: Path, tokens: list[int]) -> _Reference | None:
    """The cached reference, or None when missing, damaged, or made from other tokens."""
    try:
        with np.load(path, allow_pickle=False) as z:
            ref = _Reference(*(z[k] for k in _FIELDS))
    except (OSError, ValueError, KeyError, EOFError, TypeError, zipfile.BadZipFile):
        return None
    n = len(ref.nll)
    ok = (ref.tokens.tolist() == list(tokens) and n > 0 and ref.offsets.shape == (n + 1,) and ref.top.shape == (n,)
          and ref.offsets[0] == 0 and bool((np.diff(ref.offsets) >= 0).all()) and ref.offsets[-1] == len(ref.ids)
          and ref.logq.shape == ref.ids.shape and ref.logq.dtype == np.uint16 and np.isfinite(ref.nll).all())
    return ref if ok else None


_FIELDS = ("tokens", "offsets", "ids", "logq", "top", "nll")


def _save_cached(path: Path, ref: _Reference) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: getattr(ref, k) for k in _FIELDS})
        os.replace(tmp, path)
    except OSError:  # a cache that cannot be written is only slower next time
        tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the entry point

def _check_tokens(tokens: list[int], n_ctx: int) -> None:
    if len(tokens) < 2 * n_ctx:
        raise InvalidArgumentError(
            f"the text is {len(tokens)} tokens; perplexity with a context of {n_ctx} needs at least {2 * n_ctx}",
            hint="use a longer text or a smaller --ctx", param="ctx")


def _load_reference(settings: ModelSettings, text: str, text_sha: str, use_cache: bool,
                    progress: Progress | None) -> tuple[_Reference, bool, Path]:
    """The reference's distributions (f16 KV: ``settings`` has the default cache types), from the cache
    when it holds them; (reference, whether cached, its path)."""
    from localllm import store   # the sha256 of the file (a path): no name is looked up

    n_ctx = int(settings.n_ctx or DEFAULT_CTX)
    rs = _Scorer(settings)
    try:
        tokens = rs.tokens(text)
        _check_tokens(tokens, n_ctx)
        cfile = _cache_file(store.sha256_file(rs.path), text_sha, n_ctx)
        ref = _load_cached(cfile, tokens) if use_cache else None
        cached = ref is not None
        if ref is None:
            ref = _score_reference(rs, tokens, progress, len(tokens) // n_ctx)
            if use_cache:
                _save_cached(cfile, ref)
        return ref, cached, rs.path
    finally:
        rs.close()


def evaluate(model: str | os.PathLike[str], *, reference: str | os.PathLike[str] | None = None,
             text: str | None = None, text_name: str | None = None, n_ctx: int = DEFAULT_CTX,
             n_threads: int | None = None, use_cache: bool = True, cache_type_k: str = "f16", cache_type_v: str = "f16",
             flash_attn: str = "auto", progress: Progress | None = None) -> EvalResult:
    """Perplexity of ``model`` (a GGUF path: the CLI resolves names) on ``text`` (default:
    :func:`default_text`) and, with ``reference`` (a path), KL divergence and top-1 agreement
    against it. The KV cache types and flash attention apply to ``model`` only; the reference
    keeps f16 KV."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 8:
        raise InvalidArgumentError("the context must be an integer >= 8", param="ctx")
    ms = ModelSettings(model=model, n_ctx=n_ctx, n_threads=n_threads,
                       cache_type_k=cache_type_k, cache_type_v=cache_type_v, flash_attn=flash_attn)
    if text is None:
        text, text_name = default_text(), "built-in"
    if not text.strip():
        raise InvalidArgumentError("the evaluation text is empty", param="text")
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    t0 = time.perf_counter()
    ref: _Reference | None = None
    cached: bool | None = None
    ref_path: Path | None = None
    if reference is not None:
        rset = ModelSettings(model=reference, n_ctx=n_ctx, n_threads=n_threads)
        ref, cached, ref_path = _load_reference(rset, text, text_sha, use_cache, progress)
    scorer = _Scorer(ms)
    try:
        tokens = scorer.tokens(text)
        _check_tokens(tokens, n_ctx)
        if ref is not None and ref.tokens.tolist() != tokens:
            raise InvalidArgumentError(
                f"{scorer.path.name} and the reference {ref_path.name if ref_path else ''} tokenize the text "
                "differently: they are not the same checkpoint", param="ref")
        nll, kl, agree = _score(scorer, tokens, ref, progress)
        path = scorer.path
    finally:
        scorer.close()
    return _result(ms, str(path), ref_path, text_name, text_sha, len(tokens), nll, kl, agree, ref, cached,
                   time.perf_counter() - t0)


def _result(ms: ModelSettings, path: str, ref_path: Path | None, text_name: str | None, text_sha: str,
            n_tokens: int, nll: np.ndarray, kl: np.ndarray, agree: np.ndarray, ref: _Reference | None,
            cached: bool | None, seconds: float) -> EvalResult:
    n_ctx = int(ms.n_ctx or DEFAULT_CTX)
    ppl = summary_stats(nll)
    k = summary_stats(kl) if ref is not None else None
    return EvalResult(
        model=path, reference=str(ref_path) if ref_path else None, text=text_name or "text",
        text_sha256=text_sha, n_ctx=n_ctx, chunks=n_tokens // n_ctx, tokens=len(nll),
        perplexity=math.exp(ppl["mean"]), perplexity_error=math.exp(ppl["mean"]) * ppl["error"],
        reference_perplexity=math.exp(float(ref.nll.mean())) if ref is not None else None,
        kl_mean=k["mean"] if k else None, kl_error=k["error"] if k else None, kl_p99=k["p99"] if k else None,
        kl_max=k["max"] if k else None, top1_agreement=float(np.mean(agree)) if ref is not None else None,
        reference_cached=cached, seconds=seconds, cache_type_k=ms.cache_type_k, cache_type_v=ms.cache_type_v,
        flash_attn=ms.flash_attn)


def _score(scorer: _Scorer, tokens: list[int], ref: _Reference | None,
           progress: Progress | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n_chunks = len(tokens) // scorer.n_ctx
    nll: list[np.ndarray] = []
    kl: list[np.ndarray] = []
    agree: list[np.ndarray] = []
    row = 0
    for c, (logits, targets) in enumerate(scorer.chunks(tokens)):
        for b in range(0, len(targets), _BLOCK):
            x, t = logits[b:b + _BLOCK], targets[b:b + _BLOCK]
            if ref is not None:
                d, lq, a = _kl_rows(x, ref, row)
                kl.append(d)
                agree.append(a)
            else:
                lq = _log_softmax(x)
            nll.append(-lq[np.arange(len(t)), t])
            row += len(t)
        if progress:
            progress(c + 1, n_chunks, "model")
    empty = np.zeros(0)
    return np.concatenate(nll), (np.concatenate(kl) if kl else empty), (np.concatenate(agree) if agree else empty)


__all__ = ["EvalResult", "evaluate", "default_text", "summary_stats", "DEFAULT_CTX", "LOGP_FLOOR"]
