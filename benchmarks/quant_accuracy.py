"""Every quant type `localllm convert` offers, against transformers: a tiny
random checkpoint with 256-wide rows (so every matrix can take a K-quant) from
tests/convert_fixtures.py is converted to each type; the table gives the types
llama.cpp really wrote (read back with gguf's reader), the logits' NMSE
against transformers' fp32 logits and the top-1 agreement.

    python benchmarks/quant_accuracy.py [--arch llama]

tests/convert/test_convert_archs.py asserts bounds about 2.5 x these figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2}


def main() -> None:
    import gguf
    from convert_fixtures import build_checkpoint, gguf_logits, hf_logits, nmse

    from localllm.converter import convert
    from localllm.formats import CONVERT_QUANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="llama")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = build_checkpoint(a.arch, Path(tmp) / "hf", config=WIDE)
        ids = np.random.default_rng(1).integers(5, 380, 48).tolist()
        ref = hf_logits(root, ids)
        print(f"| type ({a.arch}) | matrix types written | logit NMSE vs transformers | top-1 agreement |")
        print("|---|---|---|---|")
        for q in CONVERT_QUANTS:
            res = convert(root, Path(tmp) / f"{q}.gguf", quant=q)
            mats = [t for t in gguf.GGUFReader(str(res.path)).tensors if len(t.shape) >= 2 and min(t.shape[:2]) > 1]
            types = ", ".join(f"{k} {v}" for k, v in Counter(t.tensor_type.name for t in mats).most_common())
            got = gguf_logits(res.path, ids)
            print(f"| {q} | {types} | {nmse(ref, got):.1e} | {np.mean(ref.argmax(-1) == got.argmax(-1)):.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
