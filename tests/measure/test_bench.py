"""``localllm bench``: documented keys, consistent figures, the plot, alternating rounds, KV cache
types and flash attention one row each. (``convert --quant auto`` is in test_autoquant.py.)"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import pytest

from localllm import bench
from tests.helpers import cli, default_quant

KEYS = {"model", "path", "quant", "size_bytes", "parameters", "threads", "prompt_tokens", "gen_tokens", "depth",
        "reps", "load_s", "prompt_tps", "gen_tps", "ttft_ms", "peak_rss_bytes", "cache_type_k", "cache_type_v",
        "flash_attn"}   # as docs/bench.md lists them


_cli = partial(cli, timeout=900)  # a bench run takes minutes on 2 cores


def test_bench_json_keys_and_consistent_figures(default_model_path: Path, tmp_path: Path) -> None:
    from localllm import store, resolve

    q4 = resolve.resolve("smollm2-135m:q4_0")
    png = tmp_path / "speed.png"
    p = _cli("bench", str(default_model_path), str(q4), "--reps", "2", "--prompt-tokens", "64",
             "--gen-tokens", "8", "--depth", "16", "--json", "-q", "--plot", str(png))
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert "cpu" in d and d["cpu"]
    rows = d["results"]
    assert [r["path"] for r in rows] == [str(default_model_path), str(q4)]
    for r in rows:
        assert set(r) == KEYS
        assert (r["prompt_tokens"], r["gen_tokens"], r["depth"], r["reps"]) == (64, 8, 16, 2)
        for k in ("load_s", "prompt_tps", "gen_tps", "ttft_ms"):
            assert 0 < r[k]["min"] <= r[k]["median"] <= r[k]["max"], (k, r[k])
        # the first token comes after the prompt was read: TTFT is at least the prompt's time
        assert r["ttft_ms"]["max"] >= 1000 * 64 / r["prompt_tps"]["max"] * 0.99
        assert r["size_bytes"] == Path(r["path"]).stat().st_size
        assert 20 << 20 < r["peak_rss_bytes"] < 8 << 30
    assert rows[0]["quant"] == default_quant() and rows[1]["quant"] == "Q4_0"
    assert all((r["cache_type_k"], r["cache_type_v"], r["flash_attn"]) == ("f16", "f16", "auto") for r in rows)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_rounds_alternate_the_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Side by side: each round runs every model once, the order reversed every other round."""
    seen: list[str] = []

    class Info:
        def __init__(self, name: str, kv: tuple[str, str] = ("f16", "f16")) -> None:
            self.path, self.quant, self.size_bytes, self.parameters, self.threads = name, "Q8_0", 1, 1, 1
            self.cache_type_k, self.cache_type_v, self.flash_attn = *kv, "auto"

    def fake_once(model: str, kv: tuple[str, str] = ("f16", "f16"), **_: object) -> tuple[Info, dict[str, float]]:
        seen.append(model if kv == ("f16", "f16") else f"{model} {kv[0]}/{kv[1]}")
        return Info(model, kv), {"load_s": 1.0, "ttft_ms": 1.0, "prompt_tps": 1.0, "gen_tps": 1.0}

    monkeypatch.setattr(bench, "_once", fake_once)
    a, b, c = (str(tmp_path / f"{n}.gguf") for n in "abc")
    for p in (a, b, c):
        Path(p).write_bytes(b"")
    bench.bench([a, b, c], reps=3)
    assert seen == [a, b, c, c, b, a, a, b, c]
    # each (model, KV types) pair is one row of the same rounds
    seen.clear()
    rows = bench.bench([a, b], reps=2, kv=["f16", "q8_0/f16"])
    aq, bq = f"{a} q8_0/f16", f"{b} q8_0/f16"
    assert seen == [a, aq, b, bq, bq, b, aq, a]
    assert [(r.path, r.kv) for r in rows] == [(a, "f16"), (a, "q8_0/f16"), (b, "f16"), (b, "q8_0/f16")]


def test_bench_errors_are_one_line(tmp_path: Path) -> None:
    cases = [(["bench", str(tmp_path / "missing.gguf"), "-q"], 1, "does not exist"),
             (["bench", "smollm2-135m", "--reps", "0"], 2, "--reps"),
             (["bench", "smollm2-135m", "--plot", str(tmp_path / "no" / "dir.png"), "-q"], 1, "does not exist"),
             (["bench", "smollm2-135m", "--kv", "f16", "--kv", "q3_k", "-q"], 1, "cache_type_k must be one of"),
             (["bench", "smollm2-135m", "--kv", "q8_0/f16/f16", "-q"], 1, "--kv takes K or K/V"),
             (["bench", "smollm2-135m", "--kv", "q8_0/", "-q"], 1, "--kv takes K or K/V"),
             (["bench", "smollm2-135m", "--kv", "f16/q4_0", "--flash-attn", "off", "-q"], 1,
              "a quantized V cache needs flash attention")]
    for args, code, msg in cases:
        p = _cli(*args)
        assert p.returncode == code, (args, p.stderr)
        assert msg in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert code != 1 or p.stderr.count("\n") == 1, p.stderr


KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +[\d.]+ MiB, V \((\w+)\)")


def test_kv_types_reach_llama_cpp_one_row_each(default_model_path: Path, tmp_path: Path) -> None:
    """--kv f16 --kv q8_0 --kv q4_0/f16: one row each, labelled, and each row's context is the one
    llama.cpp reports (q8_0 K+V is 8.5/16 of f16: 34 bytes per 32 values)."""
    from localllm import runtime

    labels: list[str] = []
    rows = bench.bench([default_model_path], kv=["f16", "q8_0", "q4_0/f16"], reps=1, prompt_tokens=16,
                       gen_tokens=4, progress=lambda d, t, what: labels.append(what))
    assert [(r.cache_type_k, r.cache_type_v, r.kv) for r in rows] == [
        ("f16", "f16", "f16"), ("q8_0", "q8_0", "q8_0"), ("q4_0", "f16", "q4_0/f16")]
    assert [w.split(" kv ")[1] for w in labels] == ["f16 fa auto", "q8_0 fa auto", "q4_0/f16 fa auto"]
    found = (KV_LINE.search(ln) for ln in runtime.log_tail(400))
    reports = [(float(m[1]), m[2], m[3]) for m in found if m][-3:]
    assert [r[1:] for r in reports] == [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "f16")]
    f16, q8, q4k = (r[0] for r in reports)
    assert q8 == pytest.approx(f16 * 8.5 / 16, rel=0.01) and q4k == pytest.approx(f16 * (4.5 + 16) / 32, rel=0.01)
    png = tmp_path / "kv.png"
    bench.plot(rows, png)
    assert png.stat().st_size > 5000


def test_cli_table_labels_rows_with_their_kv_types(default_model_path: Path) -> None:
    p = _cli("bench", str(default_model_path), "--kv", "f16", "--kv", "q8_0/f16", "--reps", "1",
             "--prompt-tokens", "16", "--gen-tokens", "4", "-q")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1].split()[:3] == ["model", "quant", "KV"]
    assert [ln.split()[2] for ln in lines[2:]] == ["f16", "q8_0/f16"]
    assert "FA" not in lines[1].split()   # one flash-attention setting: no column for it


FA_LINE = re.compile(r"llama_context: flash_attn += (\w+)")


def test_flash_attn_settings_reach_llama_cpp_one_row_each(default_model_path: Path) -> None:
    """flash_attn on, off (and on again: duplicates collapse): one row each, in the same alternating
    rounds, and each run's context is what llama.cpp reports ("flash_attn = enabled/disabled")."""
    from localllm.runtime._lib import _backend

    sink = _backend()
    mark = sink.mark()
    runs: list[tuple[str, list[str]]] = []   # per run: the progress text's FA, llama.cpp's report

    def progress(done: int, total: int, what: str) -> None:
        nonlocal mark
        runs.append((what.split(" fa ")[1], [m[1] for m in map(FA_LINE.search, sink.since(mark)) if m]))
        mark = sink.mark()

    rows = bench.bench([default_model_path], flash_attn=["on", "off", "on"], reps=2, prompt_tokens=8,
                       gen_tokens=2, progress=progress)
    assert [(r.path, r.kv, r.flash_attn, r.reps) for r in rows] == [
        (str(default_model_path), "f16", "on", 2), (str(default_model_path), "f16", "off", 2)]
    assert runs == [("on", ["enabled"]), ("off", ["disabled"]), ("off", ["disabled"]), ("on", ["enabled"])]
    assert all(0 < r.gen_tps["min"] <= r.gen_tps["max"] for r in rows)
    assert [label.split("\n")[-1] for label in bench._labels(rows)] == ["fa on", "fa off"]
    assert "\nfa " not in bench._labels(rows[:1])[0]   # one setting: the plot does not repeat it
    # a string is one setting, as before
    assert bench._combos(None, "off") == [(("f16", "f16"), "off")]


def test_cli_measures_each_flash_attn_side_by_side(default_model_path: Path) -> None:
    p = _cli("bench", str(default_model_path), "--flash-attn", "on", "--flash-attn", "off", "--reps", "1",
             "--prompt-tokens", "8", "--gen-tokens", "2", "-q")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1].split()[:4] == ["model", "quant", "KV", "FA"]
    assert [ln.split()[2:4] for ln in lines[2:]] == [["f16", "on"], ["f16", "off"]]


def test_an_invalid_kv_and_flash_attn_pair_is_refused_before_measuring(default_model_path: Path) -> None:
    """--kv q8_0 with --flash-attn on and off: q8_0 with on could run, with off it cannot, so nothing
    runs: one line, and no model was loaded (llama.cpp logs nothing, even with LOCALLLM_VERBOSE=1)."""
    from localllm.errors import InvalidArgumentError
    from localllm.runtime._lib import _backend

    env = {"LOCALLLM_VERBOSE": "1"}
    p = _cli("bench", str(default_model_path), "--kv", "q8_0", "--flash-attn", "on", "--flash-attn", "off",
             "--reps", "1", "--prompt-tokens", "8", "--gen-tokens", "2", env=env)
    assert p.returncode == 1 and p.stdout == "", p.stdout
    assert "a quantized V cache needs flash attention" in p.stderr and p.stderr.count("\n") == 1, p.stderr
    sink = _backend()
    mark = sink.mark()
    with pytest.raises(InvalidArgumentError, match="a quantized V cache needs flash attention"):
        bench.bench([default_model_path], kv=["q8_0"], flash_attn=["on", "off"], reps=1, prompt_tokens=8,
                    gen_tokens=2)
    assert sink.since(mark) == []
