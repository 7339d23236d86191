"""``localllm convert``: a Hugging Face checkpoint → a quantized GGUF."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from localllm.autoquant import DEFAULT_MAX_KL
from localllm.cli.options import human_bytes
from localllm.formats import CONVERT_QUANTS, DEFAULT_QUANT


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Output .gguf path (or use --name to add it to the model store).")
@click.option("--quant", type=click.Choice([*CONVERT_QUANTS, "auto"], case_sensitive=False), default=DEFAULT_QUANT,
              show_default=True,
              help="Weight type. Q4_K_M is the CPU default: decoding on a CPU is memory-bandwidth bound, so "
                   "~4.8 bits/weight runs ~3x faster than F16 at a small quality cost. auto: measure the "
                   "candidates on this machine and keep the fastest within --max-kl.")
@click.option("--max-kl", type=click.FloatRange(min=0), default=None,
              help=f"With --quant auto: the KL budget, mean nats per token against the lossless reference "
                   f"(default {DEFAULT_MAX_KL}).")
@click.option("--measure-all", is_flag=True,
              help="With --quant auto: score every candidate's KL, also those slower than the choice (which "
                   "cannot change it; skipped by default to save minutes).")
@click.option("--imatrix/--no-imatrix", default=None,
              help="Guide llama.cpp's quantizer with an importance matrix collected from the HF model on the "
                   "built-in calibration text (needs torch; default: when torch is installed).")
@click.option("--verify", is_flag=True, help="Compare logits with the HF original (needs torch+transformers); "
                                              "exit non-zero past the thresholds in docs/convert.md.")
@click.option("--strict", is_flag=True, help="Fail when llama.cpp tokenizes the probe corpus differently from HF.")
@click.option("--name", default=None, help="Add the result to the model store as NAME:<quant>.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Threads for llama.cpp quantization.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def command(src: str, output: str | None, quant: str, max_kl: float | None, measure_all: bool,
            imatrix: bool | None, verify: bool,
            strict: bool, name: str | None, revision: str | None, threads: int | None, quiet: bool) -> int:
    """Convert SRC (a local HF folder or a hub repo id) to GGUF.

    \b
    Supports Llama (2/3, TinyLlama, SmolLM), Mistral, Qwen2, Qwen3, Gemma,
    Gemma2, Gemma3 (text) and Phi-3. Tokenization is probed against HF after
    writing; the original tokenizer.json is embedded so `localllm run`
    tokenizes exactly as HF does when `tokenizers` is installed.
    """
    from localllm.converter import convert
    from localllm.converter.checkpoint import resolve_source
    from localllm.errors import ConversionCheckError, InvalidArgumentError

    if not output and not name:
        raise InvalidArgumentError("give -o OUT.gguf or --name NAME", param="output")
    quant = quant.upper()
    if max_kl is not None and quant != "AUTO":
        raise InvalidArgumentError("--max-kl needs --quant auto", param="max_kl")
    if measure_all and quant != "AUTO":
        raise InvalidArgumentError("--measure-all needs --quant auto", param="measure_all")
    root = resolve_source(src, revision)
    result = None
    if quant == "AUTO":
        out, quant = _auto(root, src, revision, output, name, DEFAULT_MAX_KL if max_kl is None else max_kl,
                           strict, threads, quiet, imatrix, measure_all)
        return _verify(root, out, quant) if verify else 0

    def produce(path: Path) -> None:
        nonlocal result
        try:
            result = convert(root, path, quant=quant, strict=strict, name=name, progress=not quiet,
                             threads=threads, imatrix=imatrix)
        except ConversionCheckError as e:
            result = e.result  # type: ignore[attr-defined]
            _summary(result)
            raise

    if name:
        from localllm import store

        out = store.add(produce, name, quant.lower(), source={"converted_from": str(src), "revision": revision})
    else:
        produce(Path(output))  # type: ignore[arg-type]
        out = Path(output)  # type: ignore[arg-type]
    _summary(result)
    click.echo(f"wrote {out}")
    return _verify(root, out, quant) if verify else 0


def _verify(root: Path, out: Path, quant: str) -> int:
    from localllm.converter.verify import THRESHOLDS, verify as run_verify

    rep = run_verify(root, out, quant=quant)
    mx = THRESHOLDS[quant]
    click.echo(f"verify ({rep.tokens} tokens): tokenization {'match' if rep.tokenization_match else 'DIFFERS'}, "
               f"NMSE {rep.nmse:.2e} (max {mx[0]:.0e}), top-1 {rep.top1:.3f} (min {mx[1]}), "
               f"KL {rep.kl:.2e} (max {mx[2]}), greedy {'agrees' if rep.greedy_match else 'differs'}")
    if not rep.ok:
        click.echo("verify failed: " + "; ".join(rep.failures), err=True)
        return 3
    return 0


def _auto(root: Path, src: str, revision: str | None, output: str | None, name: str | None, max_kl: float,
          strict: bool, threads: int | None, quiet: bool, imatrix: bool | None,
          measure_all: bool) -> tuple[Path, str]:
    """--quant auto: measure the candidates (localllm.autoquant.from_checkpoint), keep the choice."""
    import os

    from localllm import autoquant, settings, store
    from localllm.cli.measure import cpu_line, progress_bar

    autoquant.check_max_kl(max_kl)
    dest = settings.models_dir() if name else Path(output).resolve().parent  # type: ignore[arg-type]
    with autoquant.workdir(dest) as work:
        with progress_bar(quiet, "step") as cb:   # closed before the table is printed
            r = autoquant.from_checkpoint(root, work, max_kl=max_kl, strict=strict, name=name, n_threads=threads,
                                          imatrix=imatrix, measure_all=measure_all, show_progress=not quiet,
                                          progress=cb)
        _summary(r.reference)
        click.echo(f"importance matrix: {r.imatrix_note}")
        decision = r.decision
        click.echo(f"measured on {cpu_line()}; KL against the {decision.reference} reference on the built-in text:")
        for line in decision.lines():
            click.echo(f"  {line}")
        click.echo(f"chose {decision.quant}: {decision.reason}")
        click.echo(f"took {r.seconds / 60:.1f} min: " + ", ".join(f"{k} {v:.0f} s" for k, v in decision.seconds.items()))
        chosen = r.files[decision.quant]
        if name:
            out = store.add(lambda tmp: os.replace(chosen, tmp), name, decision.quant.lower(),
                            source={"converted_from": str(src), "revision": revision},
                            extra={"quant_choice": decision.to_dict()})
        else:
            out = Path(output)  # type: ignore[arg-type]
            os.replace(chosen, out)
    click.echo(f"wrote {out}")
    return out, decision.quant


def _summary(r) -> None:
    if r is None:
        return
    types = ", ".join(f"{k}×{v}" for k, v in sorted(r.tensor_types.items()))
    click.echo(f"{r.hf_arch} → {r.arch}: {r.parameters / 1e6:.1f}M parameters, {r.tensors} tensors ({types}), "
               f"{human_bytes(r.size_bytes)}, {r.quant}, {r.seconds:.1f} s, peak RSS {human_bytes(r.peak_rss_bytes)}")
    p = r.probe
    if p.skipped:
        click.echo(f"tokenizer probe skipped: {p.skipped}")
    else:
        click.echo(f"tokenizer probe: {p.cases} cases; llama.cpp differs from HF on {p.llama_cpp_mismatches}; "
                   f"localllm's HF path differs on {p.hf_path_mismatches}")
        for line in p.lines():
            click.echo(f"  {line}")
    if r.imatrix:
        click.echo(f"importance matrix: {r.imatrix}")
    for n in r.notes:
        click.echo(f"note: {n}", err=True)
    sys.stdout.flush()
