"""Does an importance matrix help? KL against F32 on held-out text, with and without one.

    python benchmarks/imatrix_effect.py [--quants Q4_K_M Q4_0 Q5_K_M] [--ctx 256]

The model is SmolLM2-135M rebuilt from the shipped file as an HF checkpoint
(as benchmarks/default_choice.py does). The importance matrix is collected on
the calibration text (localllm/data/calibration.txt), as `convert` does; the
KL is measured on the evaluation text (localllm/data/eval.txt), which it never
saw (other English prose, other code, other French fables).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from default_choice import hf_reference  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quants", nargs="*", default=["Q4_K_M", "Q4_0", "Q5_K_M"])
    ap.add_argument("--ctx", type=int, default=512)
    args = ap.parse_args()

    from localllm import catalog, runtime, resolve
    from localllm.converter.imatrix import calibration_text, collect
    from localllm.formats import QUANTS
    from localllm.evaluate import default_text, evaluate

    held = default_text()
    b = catalog.BUILTIN["smollm2-135m"]
    with tempfile.TemporaryDirectory(prefix="imatrix-") as tmp:
        work = Path(tmp)
        ref = hf_reference(catalog.shipped_file(b, work), work)
        imat = collect(work / "hf", calibration_text(), gguf_arch="llama", tied=True)
        print(f"importance matrix: {len(imat)} tensors from the calibration text; KL on the evaluation text")
        print(f"| quant | KL without | KL with | ratio | top-1 without | top-1 with |\n|---|---|---|---|---|---|")
        for q in args.quants:
            plain, guided = work / f"{q}.gguf", work / f"{q}-imatrix.gguf"
            runtime.quantize(ref, plain, QUANTS[q].ftype)
            runtime.quantize(ref, guided, QUANTS[q].ftype, imatrix=imat)
            a = evaluate(plain, reference=ref, text=held, text_name="eval", n_ctx=args.ctx)
            g = evaluate(guided, reference=ref, text=held, text_name="eval", n_ctx=args.ctx)
            print(f"| {q} | {a.kl_mean:.5f} ± {a.kl_error:.5f} | {g.kl_mean:.5f} ± {g.kl_error:.5f} | "
                  f"{g.kl_mean / a.kl_mean:.2f} | {100 * a.top1_agreement:.1f} % | {100 * g.top1_agreement:.1f} % |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
