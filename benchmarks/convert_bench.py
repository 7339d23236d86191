"""Peak RSS and wall time of `localllm convert` vs llama.cpp's convert_hf_to_gguf.py,
run side by side (alternating, fresh processes) on the same checkpoint.

    python benchmarks/convert_bench.py --model smollm2-f32 [--outtype f16] [--rounds 3]
    python benchmarks/convert_bench.py --model gemma3-bf16
    python benchmarks/convert_bench.py --ckpt HF_DIR

``smollm2-f32`` (538 MB, 135M parameters in f32) and ``gemma3-bf16`` (536 MB,
270M in bf16) are the issue's reference checkpoints, rebuilt without the hub:
transformers dequantizes the shipped GGUFs and saves them as safetensors with
the tokenizer (Gemma-3 also gets a ``tokenizer.model`` rebuilt from the GGUF's
SentencePiece vocabulary, which the reference needs). They are built once into
LOCALLLM_BENCH_CACHE (default ~/.cache/localllm/convert-bench), never in git.
``random`` builds a small random llama checkpoint instead.

The reference script is read from llama-cpp-python's sdist, fetched once by
benchmarks/native.py into its cache folder. Timings are only
meaningful on an idle machine: each run prints the 1-minute load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from native import source_dir  # noqa: E402  (llama.cpp's source from the pinned sdist, in a cache dir)
CACHE = Path(os.environ.get("LOCALLLM_BENCH_CACHE", "~/.cache/localllm/convert-bench")).expanduser()
TESTS = Path(__file__).resolve().parents[1] / "tests"
# name → (store reference of the shipped GGUF, torch dtype to save, tokenizer kind in tests/convert_fixtures.py)
REAL = {"smollm2-f32": ("smollm2-135m:q4_1", "float32", "smollm2"),
        "gemma3-bf16": ("gemma3-270m", "bfloat16", "gemma3")}


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = p.stderr.read()  # type: ignore[union-attr]
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{err.decode()[-3000:]}")
    return wall, ru.ru_maxrss * 1024


def build_random(root: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(TESTS))
    import convert_fixtures as cf

    cf.BASE.update(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                   num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    cf.ARCHS["llama"] = ("LlamaConfig", {}, "spm")
    return cf.build_checkpoint("llama", root)


def _sentencepiece_from_gguf(gguf_path: Path, out: Path) -> None:
    """A ``tokenizer.model`` equivalent to a GGUF's SentencePiece (llama) vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    import gguf

    f = gguf.GGUFReader(gguf_path).fields
    tokens = f["tokenizer.ggml.tokens"].contents()
    scores = f["tokenizer.ggml.scores"].contents()
    types = f["tokenizer.ggml.token_type"].contents()
    ids = {k: int(f[f"tokenizer.ggml.{k}_token_id"].contents()) for k in ("bos", "eos", "unknown", "padding")}
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(tokens)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id = ids["unknown"], ids["bos"]
    m.trainer_spec.eos_id, m.trainer_spec.pad_id = ids["eos"], ids["padding"]
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False
    m.normalizer_spec.remove_extra_whitespaces = False
    kinds = {1: pb.ModelProto.SentencePiece.NORMAL, 2: pb.ModelProto.SentencePiece.UNKNOWN,
             3: pb.ModelProto.SentencePiece.CONTROL, 4: pb.ModelProto.SentencePiece.USER_DEFINED,
             5: pb.ModelProto.SentencePiece.UNUSED, 6: pb.ModelProto.SentencePiece.BYTE}
    for t, s, k in zip(tokens, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, s, kinds.get(k, pb.ModelProto.SentencePiece.NORMAL)
    out.write_bytes(m.SerializeToString())


def build_real(name: str) -> Path:
    """Build (once) a realistic checkpoint from a shipped GGUF; returns its folder."""
    root = CACHE / name
    if (root / "config.json").exists():
        return root
    import torch
    import transformers

    sys.path.insert(0, str(TESTS))
    import convert_fixtures as cf

    from localllm import store, resolve

    ref, dtype, tok_kind = REAL[name]
    src = resolve.resolve(ref)
    tmp = root.with_name(name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                              dtype=getattr(torch, dtype))
    # the GGUF-loaded model counts as "quantized" and refuses to save: copy its
    # (dequantized) weights into a plain model of the same config
    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    plain.load_state_dict(model.state_dict())
    del model
    plain.save_pretrained(tmp, max_shard_size="2GB")
    for f in cf.tokenizer_dir(tok_kind, CACHE / "tok-train").iterdir():
        shutil.copy(f, tmp / f.name)
    if tok_kind == "gemma3":
        _sentencepiece_from_gguf(src, tmp / "tokenizer.model")
    tmp.rename(root)
    return root


def load1() -> float:
    return os.getloadavg()[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random", choices=["random", *REAL])
    ap.add_argument("--ckpt", type=Path, help="an existing HF folder instead of --model")
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--rounds", type=int, default=2, help="pairs of runs, alternating which goes first")
    ap.add_argument("--max-load", type=float, default=2.5, help="wait until the 1-min load average is below")
    ap.add_argument("--build-hidden", type=int, default=512)
    ap.add_argument("--build-layers", type=int, default=8)
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        if a.model == "random":
            build_random(a.build_only, a.build_hidden, a.build_layers)
        else:
            print(build_real(a.model))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        ckpt = a.ckpt
        if ckpt is None:
            # built in a child: Linux keeps the peak-RSS mark across fork+exec, so this
            # process must stay small for the children's numbers to be their own
            target = Path(tmp) / "hf" if a.model == "random" else CACHE / a.model
            subprocess.run([sys.executable, __file__, "--model", a.model, "--build-only", str(target),
                            "--build-hidden", str(a.build_hidden), "--build-layers", str(a.build_layers)],
                           check=True, stdout=subprocess.DEVNULL)
            ckpt = target
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        env = dict(os.environ, PYTHONPATH=str(source_dir() / "gguf-py"), NO_LOCAL_GGUF="")
        cmds = {
            "localllm convert": ([sys.executable, "-m", "localllm", "convert", str(ckpt), "-o", f"{tmp}/ours.gguf",
                                  "--quant", a.outtype.upper(), "-q"], None),
            "convert_hf_to_gguf.py": ([sys.executable, str(source_dir() / "convert_hf_to_gguf.py"), str(ckpt), "--outfile",
                                       f"{tmp}/ref.gguf", "--outtype", a.outtype], env),
        }
        res: dict[str, list[tuple[float, int]]] = {k: [] for k in cmds}
        loads: list[float] = []
        for r in range(a.rounds):
            order = list(cmds) if r % 2 == 0 else list(cmds)[::-1]
            for k in order:
                while load1() > a.max_load:
                    print(f"load {load1():.2f} > {a.max_load}: waiting", file=sys.stderr)
                    time.sleep(15)
                loads.append(load1())
                res[k].append(run(*cmds[k]))
                print(f"  round {r + 1} {k:22s} {res[k][-1][0]:7.2f} s  {res[k][-1][1] / 1e6:8.1f} MB  "
                      f"(load {loads[-1]:.2f})", file=sys.stderr)
                Path(tmp, "ours.gguf" if k.startswith("localllm") else "ref.gguf").unlink(missing_ok=True)
        med = {k: (statistics.median(t for t, _ in v), max(m for _, m in v)) for k, v in res.items()}
        ours, ref = med["localllm convert"], med["convert_hf_to_gguf.py"]
        print(f"checkpoint {ckpt.name} ({size / 1e6:.0f} MB safetensors), outtype {a.outtype}, "
              f"{a.rounds} rounds, 1-min load {min(loads):.2f}..{max(loads):.2f}")
        print("| converter | median wall s | peak RSS MB |")
        print("|---|---|---|")
        for k, (t, m) in med.items():
            print(f"| {k} | {t:.2f} | {m / 1e6:.0f} |")
        print(f"| ratio (ours/ref) | {ours[0] / ref[0]:.2f} | {ours[1] / ref[1]:.2f} |")


if __name__ == "__main__":
    main()
