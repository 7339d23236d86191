"""``localllm eval``: perplexity against transformers, KL against a full numpy
computation, the reference cache, and the real default model's quants."""

from __future__ import annotations

import json
import math
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from localllm import evaluate as ev
from localllm.errors import InvalidArgumentError
from tests.helpers import cli

_cli = partial(cli, timeout=600)  # an evaluation


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _windows(tokens: list[int], n_ctx: int, bos: int | None) -> list[list[int]]:
    out = []
    for c in range(len(tokens) // n_ctx):
        w = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            w[0] = bos
        out.append(w)
    return out


SHORT = ev.default_text()[:2500]  # a few chunks of 64 tokens: enough to compare, quick on 2 cores


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Llama checkpoint (real SmolLM2 tokenizer) and its F32 GGUF."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.convert_fixtures import build_checkpoint

    from localllm.converter import convert

    root = tmp_path_factory.mktemp("evalhf")
    ck = build_checkpoint("llama", root / "tiny")
    out = root / "tiny-f32.gguf"
    convert(ck, out, quant="F32")
    return ck, out


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The reference cache in a folder of this test's own (models are passed as paths)."""
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "cache" / "eval"


def test_perplexity_equals_transformers(tiny_hf: tuple[Path, Path], own_cache: Path) -> None:
    import torch
    import transformers

    ck, gguf = tiny_hf
    text = ev.default_text()
    n_ctx = 64
    tok = transformers.AutoTokenizer.from_pretrained(ck)
    ids = tok(text, add_special_tokens=True)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32).eval()
    nll = []
    with torch.no_grad():
        for w in _windows(ids, n_ctx, None):  # this tokenizer adds no BOS
            lp = _log_softmax(model(torch.tensor([w])).logits[0].numpy())
            for i in range(n_ctx // 2, n_ctx - 1):
                nll.append(-lp[i, w[i + 1]])
    want = math.exp(float(np.mean(nll)))
    got = ev.evaluate(gguf, text=text, n_ctx=n_ctx)
    assert got.tokens == len(nll) == (len(ids) // n_ctx) * (n_ctx - 1 - n_ctx // 2)
    assert got.perplexity == pytest.approx(want, rel=1e-4), (got.perplexity, want)
    # llama-perplexity's ± is the standard error of the mean NLL, scaled by the perplexity
    se = float(np.std(nll) / math.sqrt(len(nll) - 1))
    assert got.perplexity_error == pytest.approx(got.perplexity * se, rel=2e-2)


def test_kl_of_a_model_against_itself_is_zero(tiny_hf: tuple[Path, Path], own_cache: Path) -> None:
    _, gguf = tiny_hf
    r = ev.evaluate(gguf, reference=gguf, n_ctx=64, text=SHORT)
    assert r.kl_mean is not None and abs(r.kl_mean) < 1e-6 and r.kl_max < 1e-4
    assert r.top1_agreement == 1.0
    assert r.reference_perplexity == pytest.approx(r.perplexity, rel=1e-9)


def _full_logits(path: Path, windows: list[list[int]]) -> np.ndarray:
    """Every scored row's log-softmax, decoded straight through the runtime (not evaluate's code)."""
    from localllm import runtime

    m = runtime.LlamaModel(path)
    n = len(windows[0])
    ctx = runtime.Context(m, n_ctx=n, n_batch=n, n_threads=2)
    b = runtime.Batch(n)
    rows = []
    for w in windows:
        ctx.clear()
        b.clear()
        for i, t in enumerate(w):
            b.add(t, i, 0, True)
        ctx.decode(b)
        rows += [_log_softmax(ctx.logits(i)) for i in range(n // 2, n - 1)]
    b.close(); ctx.close(); m.close()
    return np.stack(rows)


def test_kl_and_top1_equal_a_full_numpy_computation(default_model_path: Path, own_cache: Path) -> None:
    from localllm import runtime, store, resolve

    q8, q4 = resolve.resolve("smollm2-135m:q8_0"), resolve.resolve("smollm2-135m:q4_0")
    m = runtime.LlamaModel(q8)
    tokens = m.tokenize(ev.default_text(), add_special=True, parse_special=False)[:4 * 128]
    bos = m.bos if m.add_bos else None
    m.close()
    windows = _windows(tokens, 128, bos)
    P, Q = _full_logits(q8, windows), _full_logits(q4, windows)
    full_kl = (np.exp(P) * (P - Q)).sum(axis=1)
    top1 = float(np.mean(P.argmax(1) == Q.argmax(1)))
    r = ev.evaluate(q4, reference=q8, text=_text_of(q8, tokens), n_ctx=128)
    assert r.tokens == len(full_kl)
    # llama-perplexity's floor (reference tokens under e^-16 left out) moves the mean by far less than 1 %
    assert r.kl_mean == pytest.approx(float(full_kl.mean()), rel=5e-3)
    assert r.kl_p99 == pytest.approx(float(np.percentile(full_kl, 99)), rel=2e-2)
    assert r.top1_agreement == pytest.approx(top1, abs=1e-9)
    assert r.kl_mean > 0.05  # the 4-bit requantization really differs: the comparison has something to see


def _text_of(path: Path, tokens: list[int]) -> str:
    """The text that tokenizes back to ``tokens`` (checked)."""
    from localllm import runtime

    m = runtime.LlamaModel(path)
    try:
        body = tokens[1:] if m.add_bos and tokens and tokens[0] == m.bos else tokens
        text = m.detokenize(body).decode("utf-8")
        assert m.tokenize(text, add_special=True, parse_special=False) == tokens
    finally:
        m.close()
    return text


def test_reference_cache_is_used_and_a_damaged_one_rebuilt(tiny_hf: tuple[Path, Path], own_cache: Path,
                                                           tmp_path: Path) -> None:
    import shutil

    from localllm import runtime

    _, gguf = tiny_hf
    q4 = tmp_path / "tiny-q4_0.gguf"
    runtime.quantize(gguf, q4, 2)
    text = SHORT
    first = ev.evaluate(q4, reference=gguf, n_ctx=64, text=text)
    assert first.reference_cached is False
    files = list(own_cache.glob("*.npz"))
    assert len(files) == 1
    second = ev.evaluate(q4, reference=gguf, n_ctx=64, text=text)
    assert second.reference_cached is True
    assert (second.kl_mean, second.top1_agreement) == (first.kl_mean, first.top1_agreement)
    # a damaged cache file is not trusted: rebuilt, same answer
    data = files[0].read_bytes()
    files[0].write_bytes(data[: len(data) // 2])
    third = ev.evaluate(q4, reference=gguf, n_ctx=64, text=text)
    assert third.reference_cached is False and third.kl_mean == first.kl_mean
    # a cache entry made from other tokens (same key, planted) is not used either
    other = ev.evaluate(q4, reference=gguf, n_ctx=64, text=text[::-1])
    planted = list(own_cache.glob("*.npz"))
    assert len(planted) == 2
    mine = next(p for p in planted if p.name.split("-")[1] == first.text_sha256[:20])
    theirs = next(p for p in planted if p != mine)
    shutil.copyfile(theirs, mine)
    fourth = ev.evaluate(q4, reference=gguf, n_ctx=64, text=text)
    assert fourth.reference_cached is False and fourth.kl_mean == first.kl_mean
    assert other.kl_mean != first.kl_mean


def test_short_text_and_bad_context_are_refused(tiny_hf: tuple[Path, Path]) -> None:
    _, gguf = tiny_hf
    with pytest.raises(InvalidArgumentError, match="needs at least 128"):
        ev.evaluate(gguf, text="too short", n_ctx=64)
    with pytest.raises(InvalidArgumentError, match="integer >= 8"):
        ev.evaluate(gguf, n_ctx=4)


def test_q8_0_is_closer_than_q4_0_to_the_f32_reference(default_model_path: Path, tmp_path: Path,
                                                       own_cache: Path) -> None:
    """The real default model: an F32 reference made from the shipped file (its exact weights)."""
    from localllm import runtime, store, resolve

    ref = tmp_path / "smollm2-f32.gguf"
    runtime.quantize(resolve.resolve("smollm2-135m:q4_1"), ref, 0, allow_requantize=True)
    text = ev.default_text()[:4000]
    q8 = ev.evaluate(resolve.resolve("smollm2-135m:q8_0"), reference=ref, text=text, n_ctx=256)
    q4 = ev.evaluate(resolve.resolve("smollm2-135m:q4_0"), reference=ref, text=text, n_ctx=256)
    assert q8.reference_cached is False and q4.reference_cached is True
    assert 0 < q8.kl_mean < q4.kl_mean / 5, (q8.kl_mean, q4.kl_mean)
    assert q8.top1_agreement > q4.top1_agreement


KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +[\d.]+ MiB, V \((\w+)\)")


def _kv_reports() -> list[tuple[float, str, str]]:
    """llama.cpp's own report of each context's KV cache (MiB, K type, V type), oldest first."""
    from localllm import runtime

    found = (KV_LINE.search(ln) for ln in runtime.log_tail(400))
    return [(float(m[1]), m[2], m[3]) for m in found if m]


def test_kv_cache_types_apply_to_the_model_only(default_model_path: Path, own_cache: Path) -> None:
    """eval --cache-type-k/v q8_0 on the default model against itself: the model's context gets
    q8_0 (llama.cpp's log), the reference keeps f16, the KL is the KV cache's small cost; the
    cached reference stays f16 numbers, so f16 against itself is exactly 0."""
    q8 = ev.evaluate(default_model_path, reference=default_model_path, text=SHORT, n_ctx=128,
                     cache_type_k="q8_0", cache_type_v="q8_0")
    (ref_mib, *ref_kv), (mib, *kv) = _kv_reports()[-2:]
    assert (ref_kv, kv) == (["f16", "f16"], ["q8_0", "q8_0"])
    assert mib == pytest.approx(ref_mib * 8.5 / 16, rel=0.01)   # q8_0: 34 bytes per 32 values
    assert (q8.cache_type_k, q8.cache_type_v, q8.reference_cached) == ("q8_0", "q8_0", False)
    assert 0 < q8.kl_mean < 0.05 and q8.top1_agreement > 0.85, (q8.kl_mean, q8.top1_agreement)
    same = ev.evaluate(default_model_path, reference=default_model_path, text=SHORT, n_ctx=128)
    assert same.reference_cached is True and _kv_reports()[-1][1:] == ("f16", "f16")
    assert same.kl_mean == 0.0 and same.kl_max == 0.0 and same.top1_agreement == 1.0
    assert same.perplexity == same.reference_perplexity == q8.reference_perplexity
    q4 = ev.evaluate(default_model_path, reference=default_model_path, text=SHORT, n_ctx=128,
                     cache_type_k="q4_0", cache_type_v="q4_0")
    assert q4.reference_cached is True and q4.kl_mean > 3 * q8.kl_mean, (q4.kl_mean, q8.kl_mean)


def test_bad_kv_settings_are_one_line_errors(tmp_path: Path) -> None:
    env = {"LOCALLLM_HOME": str(tmp_path / "home")}
    for args, msg in ((["--cache-type-v", "q4_0", "--flash-attn", "off"], "needs flash attention"),
                      (["--cache-type-k", "q3_k"], "cache_type_k must be one of"),
                      (["--flash-attn", "maybe"], "--flash-attn")):
        p = _cli("eval", "smollm2-135m", "--ref", "smollm2-135m", "--ctx", "128", *args, "-q", env=env)
        assert p.returncode in (1, 2), (args, p.stderr)
        assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert p.returncode == 2 or p.stderr.count("\n") == 1, p.stderr
    with pytest.raises(InvalidArgumentError, match="needs flash attention"):
        ev.evaluate("smollm2-135m", cache_type_v="q8_0", flash_attn="off")


def test_cli_eval_json_and_errors(tiny_hf: tuple[Path, Path], tmp_path: Path) -> None:
    _, gguf = tiny_hf
    env = {"LOCALLLM_HOME": str(tmp_path / "home")}
    short = tmp_path / "short.txt"
    short.write_text(SHORT)
    p = _cli("eval", str(gguf), "--ref", str(gguf), "--ctx", "64", "--text", str(short), "--json", "-q", env=env)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert set(d) == set(ev.EvalResult.__dataclass_fields__)
    assert d["kl_mean"] < 1e-6 and d["chunks"] >= 2
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 10)
    for args, msg in ((["--text", str(tmp_path / "none.txt")], "not found"), (["--text", str(bad)], "not UTF-8"),
                      (["--text", str(short), "--ctx", "256"], "needs at least 512")):
        p = _cli("eval", str(gguf), *args, "-q", env=env)
        assert p.returncode == 1, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr
