"""``localllm bench`` and ``localllm eval``: speed and quality, measured on this machine."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import click

from localllm.cli.options import human_bytes, models_dir_option
from localllm.formats import CACHE_TYPES

if TYPE_CHECKING:
    from localllm.bench import BenchResult


@contextmanager
def progress_bar(quiet: bool, unit: str) -> Iterator[Callable[[int, int, str], None] | None]:
    """A tqdm bar on stderr fed by the library's ``progress(done, total, what)`` callback."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None or bar.total != total:
            if bar is not None:
                bar.close()
            bar = tqdm(total=total, unit=unit, leave=False, dynamic_ncols=True)
        bar.set_description(what[:60])
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        if bar is not None:
            bar.close()


def cpu_line() -> str:
    from localllm import hardware

    c = hardware.cpu()
    flags = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2", "avx_vnni", "amx_int8", "neon", "dotprod")
             if c["flags"].get(f)]
    return f"{c['model']} ({c['usable_cores']} cores; {' '.join(flags) or 'no SIMD flags found'})"


def _fmt(d: dict[str, float], digits: int = 1) -> str:
    half = (d["max"] - d["min"]) / 2
    return f"{d['median']:.{digits}f} ±{half:.{digits}f}"


@click.command("bench")
@click.argument("models", nargs=-1, required=True)
@click.option("--prompt-tokens", type=click.IntRange(min=1, max=32768), default=128, show_default=True,
              help="Prompt length read per measurement.")
@click.option("--gen-tokens", type=click.IntRange(min=2, max=8192), default=64, show_default=True,
              help="Tokens generated per measurement.")
@click.option("--depth", type=click.IntRange(min=0, max=131072), default=0, show_default=True,
              help="Tokens already in the context before the prompt (speed at depth).")
@click.option("--reps", type=click.IntRange(min=1, max=100), default=3, show_default=True,
              help="Repetitions per model (rounds alternate the order of the models).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@models_dir_option
@click.option("--kv", "kv", multiple=True, metavar="K[/V]",
              help="KV cache types to measure, repeatable: q8_0 (keys and values) or q8_0/f16 "
                   "(default: f16). Each model runs once per --kv, side by side.")
@click.option("--flash-attn", "flash_attn", type=click.Choice(["auto", "on", "off"]), multiple=True,
              default=["auto"], show_default=True,
              help="llama.cpp's flash attention to measure, repeatable (a quantized V cache needs auto or "
                   "on). Each model runs once per --kv and --flash-attn, side by side.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Also draw the table as a PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def bench_command(models: tuple[str, ...], prompt_tokens: int, gen_tokens: int, depth: int, reps: int,
                  n_threads: int | None, models_dir: str | None, kv: tuple[str, ...],
                  flash_attn: tuple[str, ...], plot_path: str | None, as_json: bool, quiet: bool) -> int:
    """Measure MODELS on this machine: load time, prompt and generation speed,
    time to first token, peak memory (median ±half the range over the reps)."""
    from localllm import bench, resolve

    if plot_path:
        _check_plot(plot_path)
    bench.check_options(prompt_tokens, gen_tokens, depth, reps, kv=list(kv) or None, flash_attn=list(flash_attn))
    # every name resolved (a built-in materialised) before measuring: a missing one fails first,
    # and a version requantized on first use does not count as load time
    paths = [resolve.resolve(m, models_dir=models_dir) for m in models]
    with progress_bar(quiet, "run") as cb:
        rows = bench.bench(paths, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens, depth=depth,
                           reps=reps, n_threads=n_threads, kv=list(kv) or None,
                           flash_attn=list(flash_attn), progress=cb, names=list(models))
    cpu = cpu_line()
    if plot_path:
        bench.plot(rows, plot_path, title=f"{cpu}, {rows[0].threads} threads, pp{prompt_tokens} tg{gen_tokens}"
                                          + (f" @ depth {depth}" if depth else ""))
    if as_json:
        click.echo(json.dumps({"cpu": cpu, "results": [r.to_dict() for r in rows]}, indent=2))
        return 0
    fas = list(dict.fromkeys(r.flash_attn for r in rows))
    click.echo(f"{cpu}, {rows[0].threads} threads; prompt {prompt_tokens} tokens"
               + (f" at depth {depth}" if depth else "") + f", {gen_tokens} generated, {reps} reps"
               + (f", flash attention {fas[0]}" if fas != ["auto"] and len(fas) == 1 else ""))
    for line in _table(rows, fa_column=len(fas) > 1):
        click.echo(line)
    if plot_path:
        click.echo(f"wrote {plot_path}")
    return 0


def _table(rows: Sequence[BenchResult], fa_column: bool) -> list[str]:
    """The header and one line per row; the FA column (flash attention) only where it varies."""
    def fa(value: str) -> str:
        return f"{value:<5} " if fa_column else ""

    head = f"{'model':<34} {'quant':<7} {'KV':<9} {fa('FA')}{'size':>9} {'load s':>11} {'prompt tok/s':>14} " \
           f"{'gen tok/s':>12} {'TTFT ms':>12} {'peak RSS':>9}"
    return [head] + [f"{Path(r.path).name[:34]:<34} {r.quant:<7} {r.kv:<9} {fa(r.flash_attn)}"
                     f"{human_bytes(r.size_bytes):>9} {_fmt(r.load_s, 2):>11} {_fmt(r.prompt_tps):>14} "
                     f"{_fmt(r.gen_tps):>12} {_fmt(r.ttft_ms, 0):>12} {human_bytes(r.peak_rss_bytes):>9}"
                     for r in rows]


def _check_plot(path: str) -> None:
    from localllm.errors import InvalidArgumentError

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        raise InvalidArgumentError(f"cannot write {path}: folder {parent} does not exist", param="plot")


@click.command("eval")
@click.argument("model")
@click.option("--ref", default=None, help="Reference model (normally F16/BF16 of the same checkpoint): "
                                          "adds KL divergence and top-1 agreement.")
@click.option("--text", "text_file", type=click.Path(dir_okay=False), default=None,
              help="UTF-8 text to evaluate on (default: the built-in English + code + French text).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=8, max=131072), default=512, show_default=True,
              help="Window size; the second half of each window is scored, as llama-perplexity does.")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@models_dir_option
@click.option("--no-cache", is_flag=True, help="Recompute the reference's distributions instead of reading "
                                               "them from the cache.")
@click.option("--cache-type-k", default="f16", show_default=True, metavar="TYPE",
              help=f"MODEL's KV cache type of keys: {', '.join(CACHE_TYPES)} (the reference keeps f16).")
@click.option("--cache-type-v", default="f16", show_default=True, metavar="TYPE",
              help="MODEL's KV cache type of values (quantized needs flash attention).")
@click.option("--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="MODEL's flash attention (the reference: auto).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def eval_command(model: str, ref: str | None, text_file: str | None, n_ctx: int, n_threads: int | None,
                 models_dir: str | None, no_cache: bool, cache_type_k: str, cache_type_v: str, flash_attn: str,
                 as_json: bool, quiet: bool) -> int:
    """Perplexity of MODEL on a text and, with --ref, KL divergence and top-1
    agreement against the reference."""
    from localllm import resolve
    from localllm.evaluate import evaluate

    text = _read_text(text_file) if text_file else None
    path = resolve.resolve(model, models_dir=models_dir)
    ref_path = resolve.resolve(ref, models_dir=models_dir) if ref is not None else None
    with progress_bar(quiet, "chunk") as cb:
        r = evaluate(path, reference=ref_path, text=text, text_name=text_file, n_ctx=n_ctx, n_threads=n_threads,
                     use_cache=not no_cache, cache_type_k=cache_type_k,
                     cache_type_v=cache_type_v, flash_attn=flash_attn, progress=cb)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
        return 0
    click.echo(f"{Path(r.model).name}: {r.tokens} tokens scored in {r.chunks} chunks of {r.n_ctx} "
               f"({r.text} text), {r.seconds:.1f} s"
               + ("" if (r.cache_type_k, r.cache_type_v, r.flash_attn) == ("f16", "f16", "auto") else
                  f"; KV {r.cache_type_k}/{r.cache_type_v}, flash attention {r.flash_attn}"))
    click.echo(f"perplexity  {r.perplexity:.4f} ± {r.perplexity_error:.4f}")
    if r.reference is not None:
        click.echo(f"reference   {Path(r.reference).name}: perplexity {r.reference_perplexity:.4f}"
                   + (" (cached)" if r.reference_cached else ""))
        click.echo(f"KL          mean {r.kl_mean:.6f} ± {r.kl_error:.6f}, 99% {r.kl_p99:.6f}, max {r.kl_max:.6f}")
        click.echo(f"top-1       {100 * r.top1_agreement:.2f} % agreement")
    return 0


def _read_text(path: str) -> str:
    from localllm.errors import InvalidArgumentError

    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InvalidArgumentError(f"text file {path} not found", param="text") from None
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"{path} is not UTF-8 text (byte {e.start})", param="text") from None
    except OSError as e:
        raise InvalidArgumentError(f"cannot read {path}: {e.strerror or e}", param="text") from None


commands = [bench_command, eval_command]
