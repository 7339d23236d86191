"""``convert()``: a HF checkpoint folder → one GGUF file, with a tokenizer probe.

Steps: read config and tensor headers → pick the architecture rule → build the
vocabulary → stream the tensors into an unnamed file next to the output
(directly for F32/F16/BF16/Q8_0, or into an intermediate that llama.cpp
quantizes) → probe the tokenizer against HF on that file and patch the result
into its metadata → link it into place.

Example:
    >>> r = convert("hf/SmolLM2-135M", "smol.gguf", quant="Q8_0")       # doctest: +SKIP
    >>> r.arch, r.quant                                         # doctest: +SKIP
    ('llama', 'Q8_0')
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from localllm import hardware
from localllm.converter.checkpoint import Checkpoint, config_dtype, text_config
from localllm.converter.probe import ProbeResult, probe_gguf, skip_reason
from localllm.converter.rules import ArchRule, rule_for
from localllm.converter.tensors import DIRECT_TYPES, OutTensor, hparams, plan_tensors
from localllm.converter.tokenizer import load_vocab, write_vocab
from localllm.converter.writer import (atomic_output, check_space, disk_nearly_full, patch_u32, scratch_file,
                                       tensor_types, write_gguf)
from localllm.formats import QUANTS, parse_quant
from localllm.errors import (ConversionCheckError, DiskFullError, InsufficientMemoryError, ModelLoadError,
                             PrerequisiteError)

CONVERTER_VERSION = "1"
# the type the intermediate file gets when llama.cpp does the final quantization:
# the source's own precision, so nothing is lost before llama.cpp quantizes
_INTERMEDIATE = {"F32": "F32", "F16": "F16", "BF16": "BF16"}


@dataclass
class ConvertResult:
    """What ``convert`` produced (the CLI prints it as the summary)."""

    path: Path
    arch: str
    hf_arch: str
    quant: str
    parameters: int
    tensors: int
    size_bytes: int
    seconds: float
    peak_rss_bytes: int
    tensor_types: dict[str, int]
    probe: ProbeResult
    notes: list[str] = field(default_factory=list)
    verify: Any = None
    imatrix: str = ""   # whether an importance matrix was used, and why (not)


def peak_rss() -> int:
    """This process's peak resident memory in bytes."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def _source_type(ck: Checkpoint, outs: list[OutTensor]) -> str:
    kinds = {o.source.dtype for o in outs if o.source is not None and len(o.shape) > 1}
    return "F32" if "F32" in kinds or not kinds else "BF16" if "BF16" in kinds else "F16"


# the probe's counters: written as placeholders first in the metadata (so they can
# be found without reading the vocabulary) and patched in place after probing
PROBE_KEYS = ("localllm.tokenizer_probe.cases", "localllm.tokenizer_probe.llama_cpp_mismatches",
              "localllm.tokenizer_probe.hf_path_mismatches")


def _general(name: str, ftype: int, probe_skipped: str | None, src: Path) -> dict[str, Any]:
    g: dict[str, Any] = {}
    if probe_skipped:
        g["localllm.tokenizer_probe.skipped"] = probe_skipped
    else:
        g.update(dict.fromkeys(PROBE_KEYS, 0))
    g.update({"general.name": name, "general.file_type": int(ftype),
              "general.quantization_version": gguf.GGML_QUANT_VERSION,
              "localllm.converter.version": CONVERTER_VERSION, "general.source.url": src.name})
    return g


def _trim_heap() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise): the probe's two
    tokenizers are gone, and llama.cpp's quantize would be added on top."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def _probe_into(path: Path, hf_json: str | None) -> ProbeResult:
    """Probe the tokenizer of the written (unnamed or temp) file and record the
    result in its metadata, so the vocabulary is written only once."""
    probe = probe_gguf(path, hf_json)
    _trim_heap()
    if not probe.skipped:
        patch_u32(path, dict(zip(PROBE_KEYS, (probe.cases, probe.llama_cpp_mismatches,
                                              probe.hf_path_mismatches))))
    return probe


def convert(src: str | os.PathLike[str], out: str | os.PathLike[str], *, quant: str = "Q4_K_M",
            strict: bool = False, name: str | None = None, progress: bool = False,
            threads: int | None = None, imatrix: bool | dict[str, Any] | None = None,
            _rule: ArchRule | None = None) -> ConvertResult:
    """Convert the HF checkpoint folder ``src`` to the GGUF ``out``.

    ``strict`` makes any tokenizer-probe difference a :class:`ConversionCheckError`
    (raised after the file is written, so it can be inspected). ``imatrix``:
    an importance matrix guides llama.cpp's quantizer (True: collect one, which
    needs torch; None: collect one when torch is there; False: none; a dict: this one).

    Example:
        >>> convert("hf-model", "model.gguf", quant="F16").tensors      # doctest: +SKIP
        273
    """
    t0 = time.perf_counter()
    quant = parse_quant(quant)
    out = Path(out)
    ck = Checkpoint.open(src)
    cfg = text_config(ck.config)
    rule = _rule or rule_for(ck.config)
    notes: list[str] = []
    emb = next((r for r in ck.tensors.values() if r.name.endswith("embed_tokens.weight")), None)
    n_rows = emb.shape[0] if emb is not None else int(cfg.get("vocab_size", 0))
    vocab = load_vocab(ck.path, n_rows=n_rows, trim=rule.trim_embeddings, add_space_prefix=rule.add_space_prefix)
    notes += vocab.notes
    if config_dtype(cfg) == "bfloat16":
        notes.append("bf16 weights: kept exact (F32/BF16), or rounded to F16 where chosen")
    qpa = cfg.get("query_pre_attn_scalar")
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))
    if rule.gguf_arch.startswith("gemma") and qpa and int(qpa) != head_dim:
        notes.append(f"query_pre_attn_scalar {qpa} != head_dim {head_dim}: llama.cpp scales attention by "
                     f"head_dim except for known sizes; logits may differ")
    kv = hparams(rule, cfg)
    kv["vocab_size"] = len(vocab.tokens)
    ftype, direct = QUANTS[quant].ftype, QUANTS[quant].written
    imatrix, imatrix_note = _importance(ck, rule, cfg, quant, direct, imatrix)
    probe_outs = plan_tensors(ck, rule, cfg, gguf.GGMLQuantizationType.F32, n_vocab=len(vocab.tokens))
    stage = quant if direct else _INTERMEDIATE[_source_type(ck, probe_outs)]
    outs = plan_tensors(ck, rule, cfg, DIRECT_TYPES[stage], n_vocab=len(vocab.tokens))
    model_name = name or ck.path.name
    low = model_name.lower()
    if ("phi3" in low or "phi-3" in low) and not {"<unk>", "<s>", "</s>", "<|endoftext|>"} <= set(vocab.tokens):
        # llama.cpp sets Phi-3 token attributes by general.name and fails to load
        # when a name containing "phi3" lacks one of these tokens
        model_name = low.replace("phi-3", "phi").replace("phi3", "phi")
        notes.append(f"general.name set to {model_name!r}: llama.cpp special-cases 'phi3' names")
    need = sum(t.nbytes for t in outs)
    check_space(out, need if direct else need + _quantized_bytes(outs, quant))

    def vocab_writer(w: gguf.GGUFWriter) -> None:
        write_vocab(w, vocab, ck.path)
        # the lists are in the writer now; dropping ours lowers the probe's peak
        # (Gemma-3: 262k tokens, scores and types as Python objects)
        vocab.tokens, vocab.types, vocab.scores, vocab.merges = [], [], None, []

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=need, unit="B", unit_scale=True, desc=f"convert {stage}", file=sys.stderr)
    on_tensor = (lambda t: bar.update(t.nbytes)) if bar else None
    general = _general(model_name, ftype if direct else QUANTS[stage].ftype, skip_reason(vocab.hf_json), ck.path)
    try:
        with atomic_output(out) as tmp:
            if direct:
                write_gguf(tmp, arch=rule.gguf_arch, kv=kv, general=general, write_vocab=vocab_writer,
                           tensors=outs, on_tensor=on_tensor)
                probe = _probe_into(tmp, vocab.hf_json)
            else:
                # the weights in the source precision, then llama.cpp quantizes
                # (it copies the metadata, the probe result included)
                with scratch_file(out, stage.lower()) as mid:
                    write_gguf(mid, arch=rule.gguf_arch, kv=kv, general=general, write_vocab=vocab_writer,
                               tensors=outs, on_tensor=on_tensor)
                    probe = _probe_into(mid, vocab.hf_json)
                    if bar:
                        bar.set_description(f"quantize {quant}")
                    from localllm import runtime
                    try:
                        runtime.quantize(mid, tmp, ftype, nthread=threads or 0, imatrix=imatrix)
                    except ModelLoadError as e:
                        if disk_nearly_full(out.parent):
                            raise DiskFullError(f"{out.parent}: the disk is full; nothing was written to {out}",
                                                hint="free some space or write elsewhere (-o)",
                                                path=str(out)) from e
                        raise
    finally:
        if bar:
            bar.close()
    types = tensor_types(out)
    if not direct:
        target = quant.split("_")[0] + "_" + quant.split("_")[1] if "_K" in quant else quant
        others = {k: v for k, v in types.items() if k != "F32" and not k.startswith(target)}
        if others:
            notes.append(f"llama.cpp used other types for some tensors (rows not a multiple of 256, or "
                         f"its {quant} mixture): {others}")
    params = sum(int(_prod(t.shape)) for t in outs)
    res = ConvertResult(out, rule.gguf_arch, (ck.config.get("architectures") or ["?"])[0], quant, params,
                        len(outs), out.stat().st_size, time.perf_counter() - t0, peak_rss(), types, probe, notes,
                        imatrix=imatrix_note)
    if strict and (probe.llama_cpp_mismatches or probe.hf_path_mismatches):
        raise ConversionCheckError(
            f"{out}: the tokenizer probe found {probe.llama_cpp_mismatches} differences between HF and "
            f"llama.cpp tokenization (--strict)", hint="see the differences listed above; the file was kept",
            result=res)
    return res


def _quantized_bytes(outs: list[OutTensor], quant: str) -> int:
    """An upper bound on what llama.cpp's quantizer writes from the intermediate ``outs``: each matrix
    at the quant's bits per weight with 15 % to spare, never more than the intermediate itself; the
    output matrix (or a tied embedding, which serves as it) at Q8_0's 8.5, since llama.cpp's mixes
    raise it to Q6_K or Q8_0 (a large part of a small model: Gemma-3-270M's embedding is 62 % of it);
    rows that are not whole blocks fall back to other types, at most Q8_0. A 7B's Q4_K_M from its
    14.5 GB BF16 intermediate: about 5.1 GB, so 19.6 GB in all, not 29."""
    names = {t.name for t in outs}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    block = gguf.QK_K if "_K" in quant else 32
    total = 0
    for t in outs:
        if len(t.shape) < 2:  # norms and biases stay float
            total += t.nbytes
            continue
        bpw = QUANTS[quant].bpw * 1.15 if t.name != head and t.shape[-1] % block == 0 else 8.5
        total += min(t.nbytes, int(math.prod(t.shape) * bpw / 8))
    return total


def _importance(ck: Checkpoint, rule: ArchRule, cfg: dict[str, Any], quant: str, direct: bool,
                want: bool | dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """(the importance matrix or None, what the summary says about it)."""
    import localllm.converter.imatrix as imx

    if isinstance(want, dict):
        return want, f"given, {len(want)} tensors"
    if direct:
        return None, f"not used: {quant} is written directly"
    if want is False:
        return None, "off (--no-imatrix)"
    if not imx.available():
        if want:
            raise PrerequisiteError("--imatrix needs torch and transformers", hint="pip install 'localllm[verify]'")
        return None, "off: collecting one needs torch and transformers (pip install 'localllm[verify]')"
    dtype = imx.torch_dtype_name({r.dtype for r in ck.tensors.values()})
    need = imx.memory_needed(sum(r.n_elements for r in ck.tensors.values()), dtype,
                             hidden=int(cfg.get("hidden_size", 4096)), n_vocab=int(cfg.get("vocab_size", 32000)))
    avail = hardware.memory()["available"]
    if avail and need > avail:  # collecting runs the whole model in torch: never let it swap or be killed
        msg = (f"collecting one runs the model in torch ({dtype}), which needs about {need / 2**30:.1f} GiB; "
               f"{avail / 2**30:.1f} GiB is available")
        if want:
            raise InsufficientMemoryError(f"--imatrix: {msg}",
                                          hint="free memory, or convert with --no-imatrix (quality drops a little)")
        return None, f"skipped: {msg} (--no-imatrix says so; quality drops a little)"
    tied = cfg.get("tie_word_embeddings")
    t0 = time.perf_counter()
    m = imx.collect(ck.path, imx.calibration_text(), gguf_arch=rule.gguf_arch, dtype=dtype,
                    tied=rule.tied_default if tied is None else bool(tied))
    _trim_heap()
    return m, f"from the calibration text ({dtype}), {len(m)} tensors, {time.perf_counter() - t0:.1f} s"


def importance_for(src: str | os.PathLike[str], want: bool | None = None) -> tuple[dict[str, Any] | None, str]:
    """The importance matrix of the HF checkpoint ``src`` for quantizing it (``--quant auto``), and a note."""
    ck = Checkpoint.open(src)
    return _importance(ck, rule_for(ck.config), text_config(ck.config), "auto", False, want)


def lossless_quant(src: str | os.PathLike[str]) -> str:
    """The GGUF type that holds the checkpoint's matrices exactly: its own 16-bit type, else F32
    (``--quant auto``'s reference: a bf16 1B is 2.5 GB in BF16 against 5 GB in F32, and scored faster)."""
    ck = Checkpoint.open(src)
    kinds = {r.dtype for r in ck.tensors.values() if len(r.shape) > 1}
    return kinds.pop() if kinds in ({"BF16"}, {"F16"}) else "F32"


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
