"""KV cache types and flash attention reach llama.cpp, and the planner counts
them as llama.cpp allocates them (its own log line is the reference)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localllm import Model, plan, runtime
from localllm.errors import InvalidArgumentError
from localllm.loader import ModelSettings

KV_LINE = re.compile(r"llama_kv_cache: size = +([\d.]+) MiB .*K \((\w+)\): +[\d.]+ MiB, V \((\w+)\)")


@pytest.mark.parametrize("k,v", [("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "q4_0"), ("bf16", "q5_1")])
def test_cache_types_are_allocated_as_planned(default_model_path: Path, k: str, v: str) -> None:
    s = ModelSettings(model=default_model_path, n_ctx=1024, cache_type_k=k, cache_type_v=v)
    with Model(settings=s) as m:
        lines = [ln for ln in runtime.log_tail(400) if KV_LINE.search(ln)]
        size_mib, got_k, got_v = KV_LINE.search(lines[-1]).groups()  # llama.cpp's report for this context
        assert (got_k, got_v) == (k, v)
        assert (m.info.cache_type_k, m.info.cache_type_v) == (k, v)
        planned = plan.make_plan(default_model_path, n_ctx=1024, cache_type_k=k, cache_type_v=v).kv_bytes
        assert abs(float(size_mib) * 2**20 - planned) <= 0.01 * planned
        if (k, v) == ("q8_0", "q8_0"):  # an 8-bit cache keeps a short greedy answer
            text = m.generate("1, 2, 3, 4,", max_tokens=8, temperature=0)
    if (k, v) == ("q8_0", "q8_0"):
        with Model(default_model_path, n_ctx=1024) as m:
            assert m.generate("1, 2, 3, 4,", max_tokens=8, temperature=0) == text


def test_bad_cache_settings_are_clear_errors(default_model_path: Path) -> None:
    with pytest.raises(InvalidArgumentError, match="flash attention"):
        ModelSettings(model=default_model_path, cache_type_v="q4_0", flash_attn="off")
    with pytest.raises(InvalidArgumentError, match="cache_type_k must be one of"):
        ModelSettings(model=default_model_path, cache_type_k="q3_k")
    with pytest.raises(InvalidArgumentError, match="flash_attn"):
        ModelSettings(model=default_model_path, flash_attn="maybe")


def test_one_table_of_cache_types_for_the_cli_the_planner_and_llama_cpp() -> None:
    """formats.KV_TYPES is the one table: its ggml ids are gguf's (an independent copy of ggml.h), its bytes
    per element are gguf's block sizes, and every door offers exactly its names."""
    import gguf

    from localllm.cli import cli, register_commands
    from localllm.formats import CACHE_TYPES, KV_TYPES

    for name, t in KV_TYPES.items():
        q = gguf.GGMLQuantizationType(t.ggml_type)
        assert q.name.lower() == name
        block, size = gguf.GGML_QUANT_SIZES[q]
        assert t.bytes == size / block and t.quantized == (block > 1)
    assert runtime.KV_CACHE_TYPES == {n: t.ggml_type for n, t in KV_TYPES.items()}
    register_commands()
    offered = {(c, p.name): list(p.type.choices) for c in ("run", "serve", "plan") for p in cli.commands[c].params
               if p.name in ("cache_type_k", "cache_type_v")}
    assert len(offered) == 6 and all(v == list(CACHE_TYPES) for v in offered.values()), offered
