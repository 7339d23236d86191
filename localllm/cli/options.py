"""Options shared by several commands."""

from __future__ import annotations

from typing import Any

import click

from localllm.errors import InvalidArgumentError
from localllm.formats import CACHE_TYPES, parse_size
from localllm.placement import parse_gpu_layers, parse_gpu_memory


class GpuLayers(click.ParamType):
    name = "N|auto|all"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        try:
            return parse_gpu_layers(value)
        except InvalidArgumentError as e:
            self.fail(str(e), param, ctx)


class GpuMemory(click.ParamType):
    """``--gpu-memory``: a size like 2GiB, 512MB, 6g, or bytes (placement.parse_gpu_memory)."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | None:
        try:
            return parse_gpu_memory(value)
        except InvalidArgumentError as e:
            self.fail(str(e), param, ctx)


class PrefillMode(click.ParamType):
    """``--prefill``: exact, fair or fair:K (:func:`localllm.core.prefill.parse`), kept as given."""

    name = "exact|fair|fair:K"

    def convert(self, value: Any, param: Any, ctx: Any) -> str:
        from localllm.core.prefill import parse

        try:
            parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)
        return str(value)


class ByteSize(click.ParamType):
    """A size of at least 1 MiB, read by the one size parser (:func:`localllm.formats.parse_size`:
    512MB is 512·10⁶ bytes, 512MiB and 512M are 512·2²⁰), as ``--gpu-memory`` reads it."""

    name = "SIZE"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            n = parse_size(value, param.name if param is not None else "size")
        except InvalidArgumentError as e:
            self.fail(str(e), param, ctx)
        if n < 1 << 20:
            self.fail(f"{value!r} is less than 1 MiB", param, ctx)
        return n


def float_range(name: str) -> click.FloatRange:
    """A click range made from :data:`localllm.sampling.LIMITS` (the one table of limits)."""
    from localllm.sampling import LIMITS

    lo, hi, lo_open = LIMITS[name]
    return click.FloatRange(min=lo, max=hi, min_open=lo_open)


def int_range(name: str) -> click.IntRange:
    from localllm.sampling import INT_LIMITS

    lo, hi = INT_LIMITS[name]
    return click.IntRange(min=lo, max=hi)


def model_settings(model: str | None, n_ctx: int | None, n_threads: int | None, gpu_layers: int | str,
                   cache_type_k: str = "f16", cache_type_v: str = "f16",
                   flash_attn: str = "auto", prompt_cache: bool = True, mmap: bool | None = None,
                   **extra: Any) -> Any:
    """The flags of :func:`model_options` as one ``ModelSettings`` (``model`` as given: the door that
    loads it, ``Model`` or the server, resolves it in ``--models-dir``)."""
    from localllm.loader import ModelSettings

    return ModelSettings(model=model, n_ctx=n_ctx, n_threads=n_threads,
                         n_gpu_layers=gpu_layers, cache_type_k=cache_type_k, cache_type_v=cache_type_v,
                         flash_attn=flash_attn, prompt_cache=prompt_cache, mmap=mmap, **extra)


MMAP_HELP = ("Map the weights from the file (page cache shared with other processes) or read them into "
             "memory backed by huge pages (decode 3-16 %% faster; docs/performance.md). "
             "Default: read where the kernel offers transparent huge pages and the model fits in RAM, else map.")


models_dir_option = click.option("--models-dir", type=click.Path(file_okay=False), default=None,
                                 help="Model store to use for this command (default: LOCALLLM_HOME's, "
                                      "or models/ in a checkout).")

flash_attn_option = click.option(
    "--flash-attn", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
    help="llama.cpp's flash attention (off holds the attention scores: more memory at long contexts; "
         "on a CPU often faster for decode at depth: docs/serve.md#fairness).")


def model_options(f):
    """--ctx, --threads, --gpu-layers, --gpu-memory, --models-dir, --mmap, the KV cache, prompt cache, --speculate, --prefill."""
    for opt in reversed([
        click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
                     help="Context size in tokens (default: min(trained, 4096))."),
        click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None,
                     help="CPU threads (default: usable cores)."),
        click.option("--gpu-layers", "gpu_layers", type=GpuLayers(), default="auto", show_default=True,
                     help="Layers to offload to the GPU: N, auto or all."),
        click.option("--gpu-memory", "gpu_memory", type=GpuMemory(), default=None,
                     help="Cap on the GPU memory --gpu-layers auto may use, e.g. 2GiB (default: the free memory)."),
        models_dir_option,
        click.option("--mmap/--no-mmap", default=None, help=MMAP_HELP),
        click.option("--cache-type-k", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
                     help="KV cache type of keys (q8_0 halves its memory)."),
        click.option("--cache-type-v", type=click.Choice(list(CACHE_TYPES)), default="f16", show_default=True,
                     help="KV cache type of values (quantized needs flash attention)."),
        flash_attn_option,
        click.option("--prompt-cache/--no-prompt-cache", default=True, show_default=True,
                     help="Keep KV states of past prompts on disk (<home>/prompt-cache) and restore "
                          "the longest shared prefix, also after a restart."),
        click.option("--speculate", type=click.Choice(["on", "off"]), default="off", show_default=True,
                     help="Greedy answers draft tokens from the prompt and verify them in one batch (faster "
                          "when the answer copies its input; a near-tie may break differently)."),
        click.option("--prefill", type=PrefillMode(), default="exact", show_default=True,
                     help="How a long prompt shares the steps with answers already streaming: exact (one "
                          "canonical chunk per step, reusable bit for bit) or fair (small pieces beside the "
                          "streams, in a unified KV cache: smoother streams, slower prompt, answers that depend on the "
                          "batch, not reused past its last chunk; flash attention auto means off). fair:K sizes the "
                          "pieces so a step takes about K streams-only steps (fair = fair:2; larger K: longer "
                          "stalls, a faster prompt; docs/serve.md#fairness)."),
    ]):
        f = opt(f)
    return f


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
