"""Converter failure modes: clear errors naming the file, nothing left at OUT."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from localllm.converter import convert
from localllm.converter.checkpoint import Checkpoint, bf16_to_f32
from localllm.converter.tensors import permute_qk
from localllm.converter.tokenizer import detect_pre
from localllm.errors import CheckpointError, InvalidArgumentError, UnsupportedArchitectureError


def _safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    header, blobs, off = {}, [], 0
    for name, a in tensors.items():
        b = a.astype(np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _folder(tmp: Path, arch: str = "LlamaForCausalLM") -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps({"architectures": [arch], "hidden_size": 8,
                                                 "num_hidden_layers": 1, "num_attention_heads": 2,
                                                 "intermediate_size": 16, "vocab_size": 4}))
    _safetensors(tmp / "model.safetensors", {"model.embed_tokens.weight": np.zeros((4, 8))})
    return tmp


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedArchitectureError, match="Qwen3ForCausalLM") as e:
        convert(_folder(tmp_path / "m", "FooForCausalLM"), tmp_path / "o.gguf", quant="F32")
    assert "FooForCausalLM" in str(e.value)
    assert not (tmp_path / "o.gguf").exists()


def test_bad_json_names_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m")
    (root / "config.json").write_text('{"architectures": [')
    with pytest.raises(CheckpointError, match=r"config\.json: bad JSON at line 1"):
        Checkpoint.open(root)


def test_truncated_safetensors_names_file(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m")
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.embed_tokens\.weight'"):
        Checkpoint.open(root)


def test_missing_shard_and_index_mismatch(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m")
    (root / "model.safetensors").rename(root / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                           "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors: shard listed .* is missing"):
        Checkpoint.open(root)
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not contain tensor 'lm_head.weight'"):
        Checkpoint.open(root)


def test_no_weights(tmp_path: Path) -> None:
    root = _folder(tmp_path / "m")
    (root / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model\\*.safetensors"):
        Checkpoint.open(root)


def test_unknown_quant() -> None:
    with pytest.raises(InvalidArgumentError, match="Q4_K_M"):
        convert("/nonexistent", "/tmp/x.gguf", quant="Q3_XS")


def test_permutation_and_bf16_are_exact() -> None:
    w = np.arange(16.0).reshape(8, 2)
    p = permute_qk(w, 2)
    # head 0 rows 0..3: [0, 2, 1, 3] (half-split → interleaved); head 1 likewise
    assert p[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]
    x = np.array([1.5, -2.25, 2.0 ** 100], dtype=np.float32)  # exactly representable in bf16
    assert (bf16_to_f32((x.view(np.uint32) >> 16).astype(np.uint16)) == x).all()


def test_pre_tokenizer_from_declaration() -> None:
    from localllm.converter.tokenizer import _LLAMA3_RE, _QWEN2_RE

    def split(rx: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}
    assert detect_pre(split(_LLAMA3_RE))[0] == "llama-bpe"
    assert detect_pre(split(_QWEN2_RE))[0] == "qwen2"
    name, notes = detect_pre(split(r"\p{L}+"))
    assert name is None and "not recognized" in notes[0]


def test_bin_without_torch_says_how_to_proceed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    root = _folder(tmp_path / "m")
    (root / "model.safetensors").unlink()
    (root / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not read")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch → ImportError
    with pytest.raises(Exception, match="need torch to read") as e:
        Checkpoint.open(root)
    assert "safetensors" in (getattr(e.value, "hint", "") or "")


def test_tensor_shape_check_names_file(tmp_path: Path) -> None:
    """Without torch: a q_proj whose rows disagree with the head count names its file."""
    from localllm.converter.rules import rule_for
    from localllm.converter.tensors import Q, plan_tensors

    root = _folder(tmp_path / "m")
    _safetensors(root / "model.safetensors", {"model.embed_tokens.weight": np.zeros((4, 8)),
                                              "model.layers.0.self_attn.q_proj.weight": np.zeros((6, 8))})
    ck = Checkpoint.open(root)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*q_proj.* \[6, 8\]"):
        plan_tensors(ck, rule_for(ck.config), ck.config, Q.F32, n_vocab=4)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0"])
def test_row_chunks_equal_whole_tensor(tmp_path: Path, qtype: str) -> None:
    """Large tensors are converted in row chunks (memory); the bytes are the same,
    with the embedding trim and the Gemma +1 applied, and pages released per chunk."""
    from localllm.converter.tensors import Q, OutTensor

    rng = np.random.default_rng(0)
    root = _folder(tmp_path / "m")
    _safetensors(root / "model.safetensors", {"model.embed_tokens.weight": rng.standard_normal((100, 64))})
    ref = Checkpoint.open(root).tensors["model.embed_tokens.weight"]
    released: list[tuple[int, int]] = []
    inner = ref._release
    ref._release = lambda off, n: (released.append((off, n)), inner and inner(off, n))  # type: ignore[assignment, func-returns-value]
    t = OutTensor("token_embd.weight", (90, 64), getattr(Q, qtype), ref, [lambda a: a[:90], lambda a: a + 1.0])
    chunks = list(t.chunks(max_bytes=64 * 4 * 16))  # 16 rows a chunk
    assert len(chunks) == 6
    assert b"".join(c.tobytes() for c in chunks) == t.compute().tobytes()
    assert sum(c.nbytes for c in chunks) == t.nbytes
    assert released[0] == (0, 16 * 64 * 4) and len(released) == 6
    t.row_local = False  # e.g. the Q/K permutation: one piece
    assert len(list(t.chunks(max_bytes=64 * 4 * 16))) == 1


def test_verify_that_would_not_fit_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--verify runs the original in float32 beside the GGUF (a 7B: 29 GB): where that does not fit the
    memory available it is one line and exit 1, before transformers loads anything, and the written
    GGUF stays. The estimate is checked against the parameters counted here."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from localllm import hardware
    from localllm.cli import main
    from localllm.converter import verify as verify_mod
    from tests.convert_fixtures import build_checkpoint

    ck = build_checkpoint("llama", tmp_path / "tiny")
    from safetensors import safe_open

    n_params = 0
    for f in ck.glob("*.safetensors"):
        with safe_open(f, "np") as st:
            n_params += sum(int(np.prod(st.get_slice(k).get_shape())) for k in st.keys())
    out = tmp_path / "t.gguf"
    convert(ck, out, quant="Q8_0")
    need = verify_mod.memory_needed(n_params, out.stat().st_size)
    assert need == n_params * 4 + out.stat().st_size + (1 << 30)

    def must_not_load(*a: object, **k: object) -> None:
        raise AssertionError("the HF model was loaded although it does not fit")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", must_not_load)
    monkeypatch.setattr(hardware, "memory", lambda: {"total": need, "available": need - 1})
    from localllm.errors import InsufficientMemoryError

    with pytest.raises(InsufficientMemoryError, match="is written, not verified") as e:
        verify_mod.verify(ck, out, quant="Q8_0")
    assert e.value.needed_bytes == need  # type: ignore[attr-defined]
    out2 = tmp_path / "cli.gguf"
    with pytest.raises(SystemExit) as ex:
        main(["convert", str(ck), "-o", str(out2), "--quant", "Q8_0", "--verify", "-q"])
    err = capsys.readouterr().err
    assert ex.value.code == 1 and "--verify runs the original model in float32" in err, err
    assert "Traceback" not in err and out2.exists()
