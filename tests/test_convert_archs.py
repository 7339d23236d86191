"""Every architecture: tiny random HF checkpoint → GGUF, llama.cpp logits vs
transformers fp32 logits, and tokenization vs HF on the probe corpus."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from convert_fixtures import ARCHS, build_checkpoint, gguf_logits, hf_logits, nmse  # noqa: E402

from localllm.converter import convert  # noqa: E402
from localllm.converter.probe import CORPUS, hf_encode  # noqa: E402
from localllm.converter.rules import rule_for  # noqa: E402

SLOW = {"gemma3"}  # a real 262k-token vocabulary: the checkpoint and every write are large
PARAMS = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory):
    cache: dict[str, tuple[Path, list[int], np.ndarray]] = {}

    def get(arch: str):
        if arch not in cache:
            root = build_checkpoint(arch, tmp_path_factory.mktemp(arch) / "hf")
            ids = np.random.default_rng(1).integers(5, 380, 48).tolist()
            cache[arch] = (root, ids, hf_logits(root, ids))
        return cache[arch]
    return get


@pytest.mark.parametrize("arch", PARAMS)
def test_logits_match_transformers(arch: str, built, tmp_path: Path) -> None:
    root, ids, ref = built(arch)
    for quant, check in (("F32", lambda a, b: nmse(a, b) <= 1e-5), ("F16", lambda a, b: nmse(a, b) <= 1e-4),
                         ("Q8_0", lambda a, b: np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.95)):
        out = convert(root, tmp_path / f"{quant}.gguf", quant=quant)
        got = gguf_logits(out.path, ids)
        assert check(ref, got), f"{arch} {quant}: NMSE {nmse(ref, got):.3e}"


@pytest.mark.parametrize("arch", PARAMS)
def test_tokenization_matches_hf(arch: str, built, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    from localllm import Model, validate

    root, _, _ = built(arch)
    res = convert(root, tmp_path / "m.gguf", quant="Q8_0")
    assert res.probe.cases == 2 * len(CORPUS) and res.probe.hf_path_mismatches == 0
    meta = validate.read_header(res.path).metadata
    assert meta["localllm.tokenizer_probe.llama_cpp_mismatches"] == res.probe.llama_cpp_mismatches
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    with Model(res.path, n_ctx=64, n_gpu_layers=0) as m:
        assert m.tokenizer_source == "huggingface"
        for text in CORPUS:
            assert m.tokenize(text, add_bos=False, special=True) == hf_encode(tok, text, special=True), text
            assert m.tokenize(text, add_bos=False) == hf_encode(tok, text, special=False), text
        bos = m.tokenize("hi")  # BOS exactly as the GGUF says, on the HF path too
        assert (bos[0] == m._m.bos) == m._m.add_bos


@pytest.mark.parametrize("arch, field", [("mistral", "permute_qk"), ("gemma", "norm_plus_one")])
def test_seeded_bug_is_caught(arch: str, field: str, built, tmp_path: Path) -> None:
    """Turning a rule off (wrong rope permutation, missing Gemma +1) breaks the NMSE check."""
    root, ids, ref = built(arch)
    from localllm.converter.checkpoint import Checkpoint

    rule = rule_for(Checkpoint.open(root).config)
    broken = dataclasses.replace(rule, **{field: False})
    out = convert(root, tmp_path / "bad.gguf", quant="F32", _rule=broken)
    # the F32 check (NMSE <= 1e-5) fails: a wrong rope layout gives ~3e-4, a missing +1 ~1
    assert nmse(ref, gguf_logits(out.path, ids)) > 1e-5 * 10
    good = convert(root, tmp_path / "good.gguf", quant="F32", _rule=rule)
    assert nmse(ref, gguf_logits(good.path, ids)) <= 1e-5


def test_sharded_bf16_checkpoint(tmp_path: Path) -> None:
    """Shards with an index, bf16 weights: same logits as transformers in bf16→fp32."""
    import torch
    import transformers

    root = build_checkpoint("qwen3", tmp_path / "one")
    model = transformers.AutoModelForCausalLM.from_pretrained(root, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    for f in root.glob("tokenizer*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = list(range(10, 30))
    ref = hf_logits(tmp_path / "sharded", ids)
    res = convert(tmp_path / "sharded", tmp_path / "s.gguf", quant="BF16")
    assert nmse(ref, gguf_logits(res.path, ids)) <= 1e-4


def test_k_quant_through_llama_cpp(built, tmp_path: Path) -> None:
    root, ids, ref = built("qwen2")
    res = convert(root, tmp_path / "q.gguf", quant="Q4_K_M")
    assert res.tensor_types  # llama.cpp's fallbacks are reported
    assert any("other types" in n for n in res.notes)
    assert np.mean(ref.argmax(-1) == gguf_logits(res.path, ids).argmax(-1)) >= 0.7
    assert not list(tmp_path.glob(".*"))  # no temp files left
