"""Measure models on this machine as a user runs them: load time, prompt and
generation speed, time to first token, and peak memory, through the same
engine as ``Model`` and ``serve``.

Several models are measured side by side: each round runs every model once,
and the order alternates from round to round, so a machine that speeds up or
slows down during the run does not favour one of them. With several KV cache
types (``kv``) or flash-attention settings (``flash_attn``), each (model, KV
types, flash attention) combination is one row of those rounds.

Example:
    >>> rows = bench(["a.gguf", "b.gguf"], reps=3)                  # doctest: +SKIP
    >>> rows[0].gen_tps["median"] > 0                                # doctest: +SKIP
    True
    >>> spread([3.0, 1.0, 2.0])
    {'median': 2.0, 'min': 1.0, 'max': 3.0}
    >>> parse_kv("q8_0/f16"), parse_kv("q4_0")
    (('q8_0', 'f16'), ('q4_0', 'q4_0'))
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgumentError, ModelNotFoundError, RuntimeFailure
from localllm.formats import check_int, check_kv_type
from localllm.progress import Progress

KV = tuple[str, str]                          # (cache_type_k, cache_type_v)
Combo = tuple[KV, str]                        # (KV types, flash attention): one row per model each
# what one request looks like when "fastest" has to be one number (``turn_seconds``)
TURN_PROMPT, TURN_GEN = 256, 128


def turn_seconds(prompt_tps: float, gen_tps: float, prompt: int = TURN_PROMPT, gen: int = TURN_GEN) -> float:
    """Seconds for ``prompt`` tokens read at ``prompt_tps`` and ``gen`` generated at ``gen_tps``."""
    return prompt / prompt_tps + gen / gen_tps


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum of the repetitions."""
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


@dataclass(frozen=True)
class BenchResult:
    """One model's figures (``localllm bench --json``: these keys). Speeds are
    tokens per second; each figure is a :func:`spread` over the repetitions."""

    model: str
    path: str
    quant: str
    size_bytes: int             # the file's size
    parameters: int
    threads: int
    prompt_tokens: int
    gen_tokens: int
    depth: int
    reps: int
    load_s: dict[str, float]
    prompt_tps: dict[str, float]
    gen_tps: dict[str, float]
    ttft_ms: dict[str, float]
    peak_rss_bytes: int         # the process's peak resident memory while this model ran
    cache_type_k: str = "f16"   # the KV cache types and flash attention this row ran with
    cache_type_v: str = "f16"
    flash_attn: str = "auto"

    @property
    def kv(self) -> str:
        """The KV types as ``--kv`` spells them: ``K``, or ``K/V`` when they differ."""
        return kv_label((self.cache_type_k, self.cache_type_v))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def turn_seconds(self, prompt: int = TURN_PROMPT, gen: int = TURN_GEN) -> float:
        """Seconds for one typical request: ``prompt`` tokens read, ``gen`` generated (median speeds)."""
        return turn_seconds(self.prompt_tps["median"], self.gen_tps["median"], prompt, gen)


def parse_kv(value: str) -> KV:
    """``--kv``'s value: ``K`` (both keys and values) or ``K/V``, checked as ``ModelSettings`` checks them."""
    parts = str(value).strip().lower().split("/")
    if len(parts) > 2 or not all(parts):
        raise InvalidArgumentError(f"--kv takes K or K/V (like q8_0 or q8_0/f16), not {value!r}", param="kv")
    return check_kv_type(parts[0], "cache_type_k"), check_kv_type(parts[-1], "cache_type_v")


def kv_label(kv: KV) -> str:
    return kv[0] if kv[0] == kv[1] else f"{kv[0]}/{kv[1]}"


# --------------------------------------------------------------------------- peak memory

def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ≥ 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # never reset: a ceiling over the whole run
    return r if os.uname().sysname == "Darwin" else r * 1024


# --------------------------------------------------------------------------- one measurement

def _prompt_ids(engine: Any, n: int) -> list[int]:
    """``n`` tokens of real text (the evaluation text, repeated as needed), BOS first where the model adds one."""
    from localllm.evaluate import default_text

    ids = engine.tokenize(default_text(), add_special=False, parse_special=False)
    out = (ids * (n // max(len(ids), 1) + 1))[:n]
    bos = engine.info.bos_token
    if engine.info.add_bos and bos >= 0 and out:
        out[0] = bos
    return out


def _generate(engine: Any, ids: list[int], max_tokens: int, cuts: Sequence[int] = ()) -> Any:
    from localllm.core.request import Request
    from localllm.sampling import SamplingParams

    req = Request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), stream=False,
                  cuts=cuts)
    for ev in engine.run(req):
        if ev.kind == "error" and ev.error is not None:
            raise ev.error
    return req


def _once(model: str, *, prompt_tokens: int, gen_tokens: int, depth: int, n_threads: int | None,
          kv: KV = ("f16", "f16"), flash_attn: str = "auto") -> tuple[Any, dict[str, float]]:
    from localllm.core.engine import Engine
    from localllm.loader import ModelSettings

    settings = ModelSettings(model=model, n_ctx=depth + prompt_tokens + gen_tokens + 8,
                             prompt_cache=False,  # measures decoding, not the disk
                             n_threads=n_threads, cache_type_k=kv[0], cache_type_v=kv[1], flash_attn=flash_attn)
    t0 = time.perf_counter()
    engine = Engine(settings)
    load = time.perf_counter() - t0
    try:
        ids = _prompt_ids(engine, depth + prompt_tokens)
        _generate(engine, ids[:16], 2)            # warm-up: first-touch of the weights, thread start
        engine.forget()
        # the context already holds `depth` tokens: a prompt chunk ends there, so the measured
        # request reuses exactly those (a prefix is reused only up to a chunk's end: core/lanes.py)
        cut = [depth] if depth else []
        if depth:
            _generate(engine, ids[:depth + 1], 1, cut)
        req = _generate(engine, ids, gen_tokens, cut)
        if req.cached_tokens != depth:
            raise RuntimeFailure(f"bench: {req.cached_tokens} tokens were reused, not the depth {depth}")
        new = len(ids) - req.cached_tokens
        ttft = req.t_first - req.t_submit
        prompt_s = req.t_first - (req.t_start or req.t_submit)
        gen_s = (req.t_end or req.t_first) - req.t_first
        figures = {"load_s": load, "ttft_ms": ttft * 1e3, "prompt_tps": new / max(prompt_s, 1e-9),
                   "gen_tps": (req.completion_tokens - 1) / max(gen_s, 1e-9)}
        return engine.info, figures
    finally:
        engine.close()


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def check_options(prompt_tokens: int, gen_tokens: int, depth: int, reps: int, *,
                  kv: Sequence[str | KV] | None = None, flash_attn: str | Sequence[str] = "auto") -> None:
    """Refuse bad options before anything is resolved, loaded or measured."""
    for name, v, lo in (("prompt_tokens", prompt_tokens, 1), ("gen_tokens", gen_tokens, 2),
                        ("depth", depth, 0), ("reps", reps, 1)):
        check_int(name, v, lo)
    _combos(kv, flash_attn)


def _fa_list(flash_attn: str | Sequence[str]) -> list[str]:
    """The flash-attention settings to measure: one (a string) or several (duplicates collapse; none: auto)."""
    values = [flash_attn] if isinstance(flash_attn, str) else [str(x) for x in flash_attn]
    return list(dict.fromkeys(values or ["auto"]))


def _combos(kv: Sequence[str | KV] | None, flash_attn: str | Sequence[str]) -> list[Combo]:
    """Every (KV types, flash attention) to measure (default: f16, auto), each checked as
    ``ModelSettings`` checks it before anything runs."""
    from localllm.loader import ModelSettings   # the same checks as loading (a quantized V needs flash attention)

    kvs = [parse_kv(x) if isinstance(x, str) else (str(x[0]), str(x[1])) for x in (kv or ["f16"])]
    out = [(k, fa) for k in dict.fromkeys(kvs) for fa in _fa_list(flash_attn)]
    for (k, v), fa in out:
        ModelSettings(cache_type_k=k, cache_type_v=v, flash_attn=fa)
    return out


def _label(info: Any) -> str:
    """What a run is called in the progress text: the file, its KV types and flash attention as it ran."""
    return f"{Path(info.path).name} kv {kv_label((info.cache_type_k, info.cache_type_v))} fa {info.flash_attn}"


def _rounds(paths: Sequence[str], cells: Sequence[tuple[int, Combo]], reps: int, progress: Progress | None,
            **once: Any) -> tuple[list[Any], list[list[dict[str, float]]], list[int]]:
    """Run every cell once per round, the order reversed every other round; per cell: the engine's
    info, the figures of each round, and the peak resident memory."""
    infos: list[Any] = [None] * len(cells)
    runs: list[list[dict[str, float]]] = [[] for _ in cells]
    peaks = [0] * len(cells)
    total, done = reps * len(cells), 0
    for rep in range(reps):
        order = list(range(len(cells)))
        if rep % 2:
            order.reverse()
        for j in order:
            i, (k, fa) = cells[j]
            _reset_peak()
            infos[j], fig = _once(paths[i], kv=k, flash_attn=fa, **once)
            peaks[j] = max(peaks[j], _peak_rss())
            runs[j].append(fig)
            done += 1
            if progress:
                progress(done, total, _label(infos[j]))
    return infos, runs, peaks


def _row(model: str, info: Any, runs: Sequence[dict[str, float]], peak: int, *, prompt_tokens: int,
         gen_tokens: int, depth: int, reps: int) -> BenchResult:
    """One row: the settings as the engine ran them (``info``), the figures spread over the rounds."""
    return BenchResult(
        model=model, path=info.path, quant=info.quant, size_bytes=_file_size(info.path),
        parameters=info.parameters, threads=info.threads, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
        depth=depth, reps=reps,
        **{f: spread([r[f] for r in runs]) for f in ("load_s", "prompt_tps", "gen_tps", "ttft_ms")},
        peak_rss_bytes=peak, cache_type_k=info.cache_type_k, cache_type_v=info.cache_type_v,
        flash_attn=info.flash_attn)


def bench(models: Sequence[str | os.PathLike[str]], *, prompt_tokens: int = 128, gen_tokens: int = 64,
          depth: int = 0, reps: int = 3, n_threads: int | None = None, kv: Sequence[str | KV] | None = None,
          flash_attn: str | Sequence[str] = "auto", progress: Progress | None = None,
          names: Sequence[str] | None = None) -> list[BenchResult]:
    """Measure each of ``models`` (GGUF paths: the CLI resolves names first, so a built-in requantized
    on first use never counts as load time) with each of the KV types ``kv`` (``"K"``, ``"K/V"`` or a
    pair; default f16) and each flash-attention setting ``flash_attn`` (``"auto"``, ``"on"``, ``"off"``,
    or a sequence of them) ``reps`` times, in alternating order, and return one row per
    (model, KV types, flash attention), in that order. ``names``: what each row calls its model
    (default: the path as given)."""
    check_options(prompt_tokens, gen_tokens, depth, reps, kv=kv, flash_attn=flash_attn)
    if not models:
        raise InvalidArgumentError("give at least one model", param="models")
    combos = _combos(kv, flash_attn)
    paths = [str(m) for m in models]
    names = list(names) if names is not None else paths
    for p in paths:  # a missing file fails before any measuring
        if not Path(p).is_file():
            raise ModelNotFoundError(f"model file {p} does not exist", hint="check the path", path=p)
    cells = [(i, c) for i in range(len(names)) for c in combos]    # one row each
    infos, runs, peaks = _rounds(paths, cells, reps, progress, prompt_tokens=prompt_tokens,
                                 gen_tokens=gen_tokens, depth=depth, n_threads=n_threads)
    return [_row(names[i], infos[j], runs[j], peaks[j], prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                 depth=depth, reps=reps) for j, (i, _) in enumerate(cells)]


def _labels(rows: Sequence[BenchResult]) -> list[str]:
    """The plot's label per row; flash attention only where the rows differ in it."""
    fa = len({r.flash_attn for r in rows}) > 1
    return [f"{Path(r.path).stem}\n{r.quant} kv {r.kv}" + (f"\nfa {r.flash_attn}" if fa else "") for r in rows]


def plot(rows: Sequence[BenchResult], out: str | os.PathLike[str], title: str = "") -> Path:
    """A bar chart of prompt and generation speed (median, with the min–max range) per model."""
    from localllm.errors import PrerequisiteError

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PrerequisiteError("--plot needs matplotlib", hint="pip install matplotlib") from None
    labels = _labels(rows)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(rows) + 3), 4))
    for ax, key, what in ((axes[0], "prompt_tps", "prompt tok/s"), (axes[1], "gen_tps", "generation tok/s")):
        med = [getattr(r, key)["median"] for r in rows]
        lo = [m - getattr(r, key)["min"] for m, r in zip(med, rows)]
        hi = [getattr(r, key)["max"] - m for m, r in zip(med, rows)]
        ax.bar(range(len(rows)), med, yerr=[lo, hi], capsize=4, color="#4a7fb5")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_title(what)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(out)
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise InvalidArgumentError(f"cannot write {path}: {e.strerror or e}", param="plot") from None
    finally:
        plt.close(fig)
    return path


__all__ = ["BenchResult", "bench", "plot", "spread", "parse_kv", "kv_label", "TURN_PROMPT", "TURN_GEN"]
