"""Peak RSS and wall time of `localllm convert` vs llama.cpp's convert_hf_to_gguf.py,
run side by side (one after the other, fresh processes) on the same checkpoint.

    python benchmarks/convert_bench.py [--ckpt HF_DIR] [--outtype f16|q8_0|f32] [--build-hidden 512]

Without --ckpt a random llama-architecture checkpoint with a SentencePiece tokenizer is built
(tests/convert_fixtures.py). The reference script is read from llama-cpp-python's sdist
(LLAMA_CPP_SRC, default /tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp); it is not committed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REF = Path(os.environ.get("LLAMA_CPP_SRC", "/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"))


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
    return wall, ru.ru_maxrss * 1024


def build(root: Path, hidden: int, layers: int) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import convert_fixtures as cf

    cf.BASE.update(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                   num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    cf.ARCHS["llama"] = ("LlamaConfig", {}, "spm")
    return cf.build_checkpoint("llama", root)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", type=Path)
    ap.add_argument("--outtype", default="f16", choices=["f32", "f16", "q8_0"])
    ap.add_argument("--build-hidden", type=int, default=512)
    ap.add_argument("--build-layers", type=int, default=8)
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        build(a.build_only, a.build_hidden, a.build_layers)
        return
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = a.ckpt
        if ckpt is None:
            # built in a child: Linux keeps the peak-RSS mark across fork+exec, so this
            # process must stay small for the children's numbers to be their own
            ckpt = Path(tmp) / "hf"
            subprocess.run([sys.executable, __file__, "--build-only", str(ckpt), "--build-hidden",
                            str(a.build_hidden), "--build-layers", str(a.build_layers)], check=True,
                           stderr=subprocess.DEVNULL)
        size = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        env = dict(os.environ, PYTHONPATH=str(REF / "gguf-py"), NO_LOCAL_GGUF="")
        ours = run([sys.executable, "-m", "localllm", "convert", str(ckpt), "-o", f"{tmp}/ours.gguf",
                    "--quant", a.outtype.upper(), "-q"])
        ref = run([sys.executable, str(REF / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", f"{tmp}/ref.gguf",
                   "--outtype", a.outtype], env=env)
        print(f"checkpoint {ckpt} ({size / 1e6:.0f} MB safetensors), outtype {a.outtype}")
        print(f"localllm convert      : {ours[0]:7.2f} s  peak RSS {ours[1] / 1e6:8.1f} MB")
        print(f"convert_hf_to_gguf.py : {ref[0]:7.2f} s  peak RSS {ref[1] / 1e6:8.1f} MB")
        print(f"ratios (ours/ref)     : time {ours[0] / ref[0]:.2f}  RSS {ours[1] / ref[1]:.2f}")


if __name__ == "__main__":
    main()
