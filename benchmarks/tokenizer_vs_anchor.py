"""How faithful the GGUF vocabulary is, ours against the anchor's: for every
architecture in the tests, the tiny checkpoint of tests/convert_fixtures.py is
converted by ``localllm convert`` and by llama.cpp's ``convert_hf_to_gguf.py``
(from the pinned llama-cpp-python sdist, fetched by benchmarks/native.py), and
llama.cpp's own tokenizer on each file is compared with Hugging Face's
``tokenizers`` on the probe corpus (each string with special-token parsing on
and off).

    python benchmarks/tokenizer_vs_anchor.py [--archs llama qwen2 ...]

A file the anchor cannot write counts 0 matches, with its reason.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))


@dataclass
class Row:
    arch: str
    cases: int
    ours: int
    anchor: int
    anchor_error: str | None = None


def matches(gguf: Path, tokenizer_json: Path) -> tuple[int, int]:
    """(cases, cases where llama.cpp on ``gguf`` equals HF) over the probe corpus."""
    from tokenizers import Tokenizer

    from localllm import runtime
    from localllm.converter.probe import CORPUS, hf_encode

    tok = Tokenizer.from_file(str(tokenizer_json))
    m = runtime.LlamaModel(gguf, vocab_only=True)
    try:
        cases = ok = 0
        for text in CORPUS:
            for special in (True, False):
                cases += 1
                ok += hf_encode(tok, text, special=special) == list(
                    m.tokenize(text, add_special=False, parse_special=special))
        return cases, ok
    finally:
        m.close()


def anchor_convert(ckpt: Path, out: Path) -> str | None:
    """Run convert_hf_to_gguf.py; None on success, else the last line of its error."""
    from native import source_dir

    src = source_dir()
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(ckpt), "--outfile", str(out),
                        "--outtype", "f32"], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not out.exists():
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        return lines[-1][:200] if lines else f"exit {r.returncode}"
    return None


def compare(arch: str, tmp: Path) -> Row:
    from convert_fixtures import build_checkpoint

    from localllm.converter import convert

    ckpt = build_checkpoint(arch, tmp / arch / "hf")
    ours = convert(ckpt, tmp / arch / "ours.gguf", quant="F32")
    cases, ok_ours = matches(ours.path, ckpt / "tokenizer.json")
    err = anchor_convert(ckpt, tmp / arch / "anchor.gguf")
    ok_anchor = 0 if err else matches(tmp / arch / "anchor.gguf", ckpt / "tokenizer.json")[1]
    return Row(arch, cases, ok_ours, ok_anchor, err)


def main() -> None:
    from convert_fixtures import ARCHS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("| architecture | probe cases | localllm convert matches HF | convert_hf_to_gguf.py matches HF |")
        print("|---|---|---|---|")
        for arch in a.archs:
            r = compare(arch, Path(tmp))
            anchor = f"{r.anchor}" + (f" (could not convert: {r.anchor_error})" if r.anchor_error else "")
            print(f"| {r.arch} | {r.cases} | {r.ours} | {anchor} |", flush=True)


if __name__ == "__main__":
    main()
