"""``localllm plan MODEL``: how much memory a model needs, and where it goes."""

from __future__ import annotations

import json

import click

from localllm.cli.options import MMAP_HELP, GpuMemory, flash_attn_option, human_bytes, models_dir_option
from localllm.formats import CACHE_TYPES


def table(p: dict) -> str:
    """The plan as rows (also used by ``doctor --model``)."""
    rows = [
        ("model", f"{p['path']} ({p['quant']}, {p['parameters'] / 1e6:.1f}M parameters, {p['n_layer']} layers)"),
        ("context", f"{p['n_ctx']} tokens"),
        ("weights (mapped file)", human_bytes(p["file_bytes"])) if p["mmap"] else
        ("weights (in memory)", human_bytes(p["weights_bytes"])),
        ("repacked weights", human_bytes(p["repack_bytes"]) + ("" if p["mmap"] else " (included above)")),
        ("vocabulary tables", human_bytes(p["vocab_bytes"])),
        ("KV cache", human_bytes(p["kv_bytes"])),
        ("output buffer", human_bytes(p["output_bytes"])),
        ("compute buffer", f"{human_bytes(p['compute_bytes'])} resident "
                           f"({human_bytes(p['compute_reserved_bytes'])} reserved)"),
        ("GPU layers", str(p["gpu_layers"])),
        ("RAM needed", f"{human_bytes(p['ram_bytes'])} of {human_bytes(p['ram_available'])} available"),
        ("VRAM needed", f"{human_bytes(p['vram_bytes'])} of {human_bytes(p['gpu_free'])} free"),
        ("fits", "yes" if p["fits"] else "NO"),
    ]
    w = max(len(k) for k, _ in rows)
    lines = [f"{k:<{w}}  {v}" for k, v in rows]
    lines += [f"- {r}" for r in p["reasons"]]
    return "\n".join(lines)


@click.command("plan")
@click.argument("model", required=False)
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
              help="Context size in tokens (default: min(trained, 4096)).")
@click.option("--gpu-memory", type=GpuMemory(), default=None, help="Cap on GPU memory to use, e.g. 6GiB.")
@click.option("--cache-type-k", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
              help="KV cache type of keys.")
@click.option("--cache-type-v", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
              help="KV cache type of values.")
@click.option("--mmap/--no-mmap", default=None, help=MMAP_HELP)
@flash_attn_option
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
@models_dir_option
def command(model: str | None, n_ctx: int | None, gpu_memory: int | None, cache_type_k: str, cache_type_v: str,
            mmap: bool | None, flash_attn: str, as_json: bool, models_dir: str | None) -> int:
    """Show the memory MODEL needs at --ctx and how many layers go to the GPU. Exits 1 if it does not fit."""
    from localllm import loader, resolve, validate

    path = resolve.resolve(model, models_dir=models_dir)
    settings = loader.ModelSettings(model=path, n_ctx=n_ctx, gpu_memory=gpu_memory, cache_type_k=cache_type_k,
                                    cache_type_v=cache_type_v, mmap=mmap, flash_attn=flash_attn)
    p = settings.plan(validate.read_header(path)).to_dict()   # what `serve` and the pool plan and load
    click.echo(json.dumps(p, indent=2) if as_json else table(p))
    return 0 if p["fits"] else 1
