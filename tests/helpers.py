"""Helpers shared by the tests (fixtures stay in conftest.py).

- ``ROOT``, ``TESTS``: the checkout and this folder;
- :func:`cli`: ``python -m localllm ARGS`` as a user runs it;
- :func:`free_port`: a free loopback port;
- :func:`metric`: one sample of a server's ``/metrics`` (a missing one fails the test);
- :func:`default_quant`, :func:`turn_end_cut`: what the default model's version is, and how
  much of a chat prompt a later prompt reuses;
- :func:`write_tiny_llama`: tiny GGUF files made by the tests themselves (random weights, real format);
  :func:`copy_gguf`: a real model with metadata changed (FIM tokens added).
- :func:`with_template`: a copy of a GGUF with another chat template (``QWEN3_STYLE``: a reasoning
  model's template, ``<think>`` opened by the generation prompt and Qwen3's ``enable_thinking`` switch).

The other helper modules sit beside this one: ``serverutil`` (a live in-process server and
plain HTTP), ``convert_fixtures`` (tiny HF checkpoints), ``llama_reference`` (llama-cpp-python's
own logits), ``reliability_doc`` (the tables of docs/RELIABILITY.md), and ``gguf_fuzz`` and
``gpu_probe``, which the tests also run as scripts. Fixture files are in ``fixtures/``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
FIXTURES = TESTS / "fixtures"


# ---------------------------------------------------------------- processes and servers

def cli(*args: str, env: dict[str, str | None] | None = None, timeout: float = 120,
        **kw: object) -> subprocess.CompletedProcess:
    """``python -m localllm ARGS`` from the checkout, output captured as text.

    The environment is this one without ``LOCALLLM_DEBUG`` (errors must be one line by default),
    updated with ``env``, where a value of None removes the variable. ``kw`` goes to
    :func:`subprocess.run` (``input=...``, ``stdin=...``)."""
    e = {k: v for k, v in os.environ.items() if k != "LOCALLLM_DEBUG"}
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return subprocess.run([sys.executable, "-m", "localllm", *args], capture_output=True, text=True, env=e,
                          timeout=timeout, cwd=ROOT, **kw)  # type: ignore[call-overload]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 (the kernel picks it), for a server the test starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_REQUIRED = object()


def metric(url: str, name: str, default: float | object = _REQUIRED) -> float:
    """The value of one sample line of ``url + "/metrics"``. ``name`` includes its labels as /metrics
    writes them (``localllm_requests_total{endpoint="api.completions",status="200"}``).

    A sample that is not there fails the test, unless the caller gives a ``default`` (a labelled
    counter appears only once something was counted)."""
    from tests.serverutil import get

    text = get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[-1])
    if default is _REQUIRED:
        raise AssertionError(f"no {name} in {url}/metrics")
    return float(default)  # type: ignore[arg-type]


# ---------------------------------------------------------------- the default model

def turn_end_cut(ids: list[int], end: int) -> int:
    """How much of a chat prompt a later prompt reuses: up to the end of its last finished turn
    (token ``end``) that is at least MIN_CHUNK tokens after the previous one (the rule of
    localllm.core.lanes.cuts, written again from its documentation)."""
    from localllm.core.lanes import MIN_CHUNK

    ends = [i + 1 for i, t in enumerate(ids) if t == end]
    return max((e for e, b in zip(ends, [0] + ends) if e - b >= MIN_CHUNK), default=0)


def default_quant() -> str:
    """The default model's version on this CPU, as the measured table says (else as first use measured it)."""
    import json

    from localllm import catalog, settings

    entry = catalog.quant_table().get(catalog.DEFAULT_MODEL, {}).get(catalog.feature_set())
    if entry is not None:
        return str(entry["quant"]).upper()
    rec = json.loads((settings.models_dir() / catalog.DEFAULT_MODEL / "auto.json").read_text())
    return str(rec["version"]).upper()


# ---------------------------------------------------------------- tiny GGUF files

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "and", "hello", "world"]


def write_tiny_llama(path: Path, *, arch: str = "llama", n_embd: int = 64, n_layer: int = 2, n_head: int = 4,
                     n_ff: int = 128, ctx: int = 256, seed: int = 0, scale: float = 0.02) -> Path:
    """A 2-layer llama with a SentencePiece-style vocab (bytes + a few words);
    a larger ``scale`` gives peaked next-token distributions (no near-ties)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-test")
    w.add_context_length(ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁" + x for x in WORDS]
    types = [2, 3, 3] + [6] * 256 + [1] * len(WORDS)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(len(WORDS))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    n_vocab = len(tokens)

    def t(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w.add_tensor("token_embd.weight", t(n_vocab, n_embd))
    for i in range(n_layer):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(n_embd, np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", t(n_embd, n_embd))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(n_embd, np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_up.weight", t(n_ff, n_embd))
        w.add_tensor(f"blk.{i}.ffn_down.weight", t(n_embd, n_ff))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    w.add_tensor("output.weight", t(n_vocab, n_embd))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def copy_gguf(src: Path, dst: Path, ints: dict[str, int]) -> Path:
    """``src`` with the unsigned-int metadata ``ints`` added or replaced (weights copied as they are):
    e.g. FIM token ids on a model that has none."""
    import logging

    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    logging.getLogger("gguf-new-metadata").setLevel(logging.WARNING)
    reader = gguf.GGUFReader(str(src), "r")
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(str(dst), arch=arch, endianess=reader.endianess)
    align = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if align is not None:
        writer.data_alignment = align.contents()
    new = {k: MetadataDetails(gguf.GGUFValueType.UINT32, v) for k, v in ints.items()}
    copy_with_new_metadata(reader, writer, new, [])
    return dst


def tiny_bert_reranker_weights(n_vocab: int, n_embd: int = 32, n_layer: int = 2, n_ff: int = 64,
                               ctx: int = 128, seed: int = 0, scale: float = 0.5) -> dict:
    """Random weights of a tiny BERT cross-encoder (numpy shapes: rows out, columns in)."""
    import numpy as np

    rng = np.random.default_rng(seed)

    def t(*shape: int, s: float = scale) -> np.ndarray:
        return (rng.standard_normal(shape) * s / np.sqrt(shape[-1])).astype(np.float32)

    w = {"token_embd.weight": t(n_vocab, n_embd, s=3.0), "token_types.weight": t(2, n_embd, s=3.0),
         "position_embd.weight": t(ctx, n_embd, s=3.0),
         "token_embd_norm.weight": 1 + t(n_embd, s=0.1), "token_embd_norm.bias": t(n_embd, s=0.1)}
    for i in range(n_layer):
        for name, rows, cols in (("attn_q", n_embd, n_embd), ("attn_k", n_embd, n_embd), ("attn_v", n_embd, n_embd),
                                 ("attn_output", n_embd, n_embd), ("ffn_up", n_ff, n_embd),
                                 ("ffn_down", n_embd, n_ff)):
            w[f"blk.{i}.{name}.weight"] = t(rows, cols, s=3.0)
            w[f"blk.{i}.{name}.bias"] = t(rows, s=0.1)
        for name in ("attn_output_norm", "layer_output_norm"):
            w[f"blk.{i}.{name}.weight"] = 1 + t(n_embd, s=0.1)
            w[f"blk.{i}.{name}.bias"] = t(n_embd, s=0.1)
    w["cls.weight"], w["cls.bias"] = t(n_embd, n_embd, s=3.0), t(n_embd, s=0.1)
    w["cls.output.weight"], w["cls.output.bias"] = t(1, n_embd, s=3.0), t(1, s=0.1)
    return w


def write_tiny_bert_reranker(path: Path, *, n_head: int = 4, ctx: int = 128, seed: int = 0) -> tuple[Path, dict]:
    """A 2-layer BERT cross-encoder (bge-reranker's layout: ``cls`` + ``cls.output`` head, pooling RANK)
    with the SentencePiece-style vocab of :func:`write_tiny_llama`; returns the path and the weights."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["▁" + x for x in WORDS]
    w = tiny_bert_reranker_weights(len(tokens), ctx=ctx, seed=seed)
    n_embd, n_layer = w["token_embd.weight"].shape[1], sum(k.endswith("ffn_up.weight") for k in w)
    g = gguf.GGUFWriter(str(path), "bert")
    g.add_name("tiny-reranker")
    g.add_context_length(ctx)
    g.add_embedding_length(n_embd)
    g.add_block_count(n_layer)
    g.add_feed_forward_length(w["blk.0.ffn_up.weight"].shape[0])
    g.add_head_count(n_head)
    g.add_layer_norm_eps(1e-12)
    g.add_causal_attention(False)
    g.add_pooling_type(gguf.PoolingType.RANK)
    g.add_classifier_output_labels(["LABEL_0"])
    g.add_file_type(gguf.LlamaFileType.ALL_F32)
    g.add_tokenizer_model("llama")
    g.add_token_list(tokens)
    g.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(WORDS))])
    g.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(WORDS))
    g.add_token_type_count(2)
    g.add_bos_token_id(1)
    g.add_eos_token_id(2)
    g.add_unk_token_id(0)
    g.add_add_bos_token(True)
    g.add_add_eos_token(True)
    for name, arr in w.items():
        g.add_tensor(name, arr)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path, w
# A Qwen3-Thinking-style template on ChatML tokens: the generation prompt opens <think>, earlier
# answers lose their reasoning, and enable_thinking=false writes the empty think block instead.
QWEN3_STYLE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}{{- (message['content'] or '').split('</think>')[-1].lstrip('\\n') }}"
    "{%- else %}{{- message['content'] or '' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}{{- '<think>\\n' }}{%- endif %}{%- endif %}"
)
# the same without the switch (thinking is off only by forcing the close marker)
QWEN3_NO_SWITCH = QWEN3_STYLE.replace("enable_thinking is defined and enable_thinking is false", "false")


def with_template(src: Path, dst: Path, template: str) -> Path:
    """A copy of the GGUF ``src`` at ``dst`` whose ``tokenizer.chat_template`` is ``template``
    (gguf's own gguf_new_metadata script)."""
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(src), str(dst),
                    "--chat-template", template, "--force"], check=True, capture_output=True, timeout=300)
    return dst
