"""Choose a built-in model's version for this CPU by measurement, and record
the table in localllm/data/quant_table.json under this CPU's feature set.

    python benchmarks/default_choice.py [smollm2-135m] [--max-kl 0.05] [--dry-run]

The reference: the original weights are not reachable offline, so transformers
loads the shipped GGUF (dequantizing it), saves it as an HF checkpoint, and
localllm's converter writes that back at F32. Every candidate is quantized
from that F32 file by llama.cpp, then measured for speed and for KL against
it on the built-in evaluation text (localllm.autoquant). The script also
checks that this F32 file has the same logits as llama.cpp's own
dequantization of the shipped file: the reference is the shipped weights,
exactly, and its limit is theirs (a 4-bit file: KL here measures the distance
from the shipped model, not from the original bf16 training weights).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # convert_fixtures.hf_from_gguf
TABLE = HERE.parent / "localllm" / "data" / "quant_table.json"


def hf_reference(shipped: Path, work: Path) -> Path:
    """The shipped GGUF → transformers → HF checkpoint → localllm convert at F32."""
    from convert_fixtures import hf_from_gguf

    from localllm.converter import convert

    ref = work / "reference-f32.gguf"
    convert(hf_from_gguf(shipped, work / "hf"), ref, quant="F32")
    return ref


def logits_gap(a: Path, b: Path) -> float:
    """NMSE between two files' logits on the same 128 token ids (llama.cpp's tokenizer of file a)."""
    from convert_fixtures import gguf_logits

    from localllm import runtime
    from localllm.evaluate import default_text

    m = runtime.LlamaModel(a)
    ids = m.tokenize(default_text()[:2000], add_special=True, parse_special=False)[:128]
    m.close()
    x, y = gguf_logits(a, ids), gguf_logits(b, ids)
    return float(np.mean((x - y) ** 2) / np.var(y))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", default="smollm2-135m")
    ap.add_argument("--max-kl", type=float, default=None)
    ap.add_argument("--dry-run", action="store_true", help="print, do not write the table")
    args = ap.parse_args()

    from localllm import autoquant, catalog, runtime, resolve

    b = catalog.BUILTIN[args.name]
    max_kl = autoquant.DEFAULT_MAX_KL if args.max_kl is None else args.max_kl
    key = catalog.feature_set()
    with tempfile.TemporaryDirectory(prefix="default-choice-") as tmp:
        work = Path(tmp)
        shipped = catalog.shipped_file(b, work)
        ref = hf_reference(shipped, work)
        dequant = work / "llama-dequant-f32.gguf"
        runtime.quantize(shipped, dequant, 0, allow_requantize=True)
        gap = logits_gap(dequant, ref)
        print(f"reference check: NMSE of the transformers-built F32 against llama.cpp's dequantization: {gap:.2e}")
        decision, _ = autoquant.choose(ref, work, max_kl=max_kl, candidates=resolve.auto_candidates(b),
                                       reps=3, measure_all=True,  # the published table shows every row
                                       progress=lambda d, t, w: print(f"  [{d}/{t}] {w}", file=sys.stderr))
    for line in decision.lines():
        print(line)
    print(f"{args.name} on {key}: {decision.quant} ({decision.reason})")
    entry = {**decision.to_dict(), "feature_set": key, "date": datetime.date.today().isoformat(),
             "command": f"python benchmarks/default_choice.py {args.name}",
             "reference_note": f"F32 built with transformers from the shipped file; NMSE against llama.cpp's "
                               f"dequantization {gap:.1e}"}
    if args.dry_run:
        return 0
    table = json.loads(TABLE.read_text()) if TABLE.exists() else {}
    table.setdefault(args.name, {})[key] = entry
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
