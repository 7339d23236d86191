"""``--quant auto``: choose the weight type by measurement on this machine.

From a highest-precision reference GGUF, llama.cpp quantizes each candidate;
each is measured for speed (:func:`localllm.bench.bench`, side by side) and
for quality (KL divergence from the reference on the evaluation text,
:func:`localllm.evaluate.evaluate`). The choice is the fastest candidate whose
mean KL is within the budget, "fastest" meaning the shortest typical request
(``bench.TURN_PROMPT`` prompt tokens read plus ``bench.TURN_GEN`` generated).
Candidates within ``SPEED_TIE`` (3 %) of the fastest count as equally fast,
and the most precise of them wins. No candidate within the budget → the most precise one, and the reason says so.

Example:
    >>> rows = [Measured("Q8_0", 1, 0.002, 0.01, 0.98, 10.0, 500.0, 90.0),
    ...         Measured("Q4_0", 1, 0.09, 0.8, 0.85, 11.0, 800.0, 150.0)]
    >>> decide(rows, max_kl=0.05)[0]
    'Q8_0'
    >>> decide(rows, max_kl=0.1)[0]
    'Q4_0'
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from localllm.errors import InvalidArgumentError
from localllm.formats import QUANTS
from localllm.progress import Progress

# candidates, most precise first
CANDIDATES = ("BF16", "F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
# mean KL per token (nats) against the reference: Q8_0 stays far below it, 4-bit
# quants of 0.5-8B models land around 0.02-0.1 (docs/convert.md, "Choosing by measurement")
DEFAULT_MAX_KL = 0.05
# requests within this fraction of the fastest count as equally fast: the most precise of them wins
# (two runs of the same benchmark differ by a few percent, more than some candidates do)
SPEED_TIE = 0.03


@dataclass(frozen=True)
class Measured:
    """One candidate as measured on this machine."""

    quant: str
    size_bytes: int
    kl_mean: float
    kl_p99: float
    top1: float
    perplexity: float
    prompt_tps: float
    gen_tps: float

    @property
    def turn_s(self) -> float:
        from localllm.bench import TURN_GEN, TURN_PROMPT

        return TURN_PROMPT / self.prompt_tps + TURN_GEN / self.gen_tps


@dataclass(frozen=True)
class Decision:
    """The choice and the table it was made from (recorded in the store manifest)."""

    quant: str
    reason: str
    max_kl: float
    reference: str                      # the reference's quant
    cpu: dict[str, Any]                 # model and SIMD flags of the machine that measured
    source: str                         # "measured" or "table:<feature set>"
    rows: list[Measured] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for r, m in zip(d["rows"], self.rows):
            r["turn_s"] = m.turn_s
        return d

    def lines(self) -> list[str]:
        """The table as text, the chosen row marked."""
        from localllm.bench import TURN_GEN, TURN_PROMPT

        out = [f"{'quant':<8} {'size MiB':>9} {'KL mean':>9} {'KL 99%':>8} {'top-1':>6} {'prompt t/s':>10} "
               f"{'gen t/s':>8} {f'turn s ({TURN_PROMPT}+{TURN_GEN})':>17}"]
        for r in self.rows:
            mark = "  <- chosen" if r.quant == self.quant else ("" if r.kl_mean <= self.max_kl else "  over budget")
            out.append(f"{r.quant:<8} {r.size_bytes / 2**20:>9.1f} {r.kl_mean:>9.5f} {r.kl_p99:>8.4f} "
                       f"{100 * r.top1:>5.1f}% {r.prompt_tps:>10.1f} {r.gen_tps:>8.1f} {r.turn_s:>17.2f}{mark}")
        return out


@contextlib.contextmanager
def workdir(parent: Path) -> Iterator[Path]:
    """A scratch folder in ``parent`` (same disk, so the chosen file is renamed, not copied),
    removed at the end; ones left by killed runs (their process is gone) are removed first."""
    parent.mkdir(parents=True, exist_ok=True)
    for old in parent.glob(".localllm-auto-*"):
        try:
            pid = int(old.name.split("-")[3])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(old, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass
    work = Path(tempfile.mkdtemp(prefix=f".localllm-auto-{os.getpid()}-", dir=parent))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_max_kl(max_kl: float) -> float:
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not 0 <= max_kl < float("inf"):
        raise InvalidArgumentError("the KL budget (--max-kl) must be a number >= 0", param="max_kl")
    return float(max_kl)


def decide(rows: Sequence[Measured], max_kl: float) -> tuple[str, str]:
    """(chosen quant, why): the shortest typical request among the rows within ``max_kl``."""
    max_kl = check_max_kl(max_kl)
    if not rows:
        raise InvalidArgumentError("no candidates to choose from", param="quant")
    within = [r for r in rows if r.kl_mean <= max_kl]
    if not within:
        best = min(rows, key=lambda r: r.kl_mean)
        return best.quant, (f"no candidate is within the KL budget {max_kl:g} (the smallest KL is "
                            f"{best.kl_mean:.4g}, {best.quant}): chose the most precise")
    best = min(r.turn_s for r in within)
    tied = [r for r in within if r.turn_s <= best * (1 + SPEED_TIE)]
    pick = min(tied, key=lambda r: r.kl_mean)
    why = (f"fastest of the {len(within)} candidates within the KL budget {max_kl:g} "
           f"({pick.turn_s:.2f} s per typical request)")
    if len(tied) > 1:
        why += (f"; {', '.join(r.quant for r in tied if r is not pick)} within {SPEED_TIE:.0%} of its speed "
                "but further from the reference")
    return pick.quant, why


def _cpu() -> dict[str, Any]:
    from localllm import hardware

    c = hardware.cpu()
    return {"model": c["model"], "arch": c["arch"], "flags": sorted(f for f, on in c["flags"].items() if on)}


def measure(reference: Path, workdir: Path, *, candidates: Sequence[str] = CANDIDATES, n_threads: int | None = None,
            reps: int = 2, progress: Progress | None = None,
            imatrix: dict[str, Any] | None = None) -> tuple[list[Measured], dict[str, Path]]:
    """Quantize every candidate from ``reference`` into ``workdir`` and measure each.
    Returns the rows (in ``candidates`` order) and the candidate files."""
    from localllm import bench, runtime, validate
    from localllm.evaluate import DEFAULT_CTX, evaluate

    header = validate.read_header(reference)
    ref_quant = header.quant
    # the evaluation window: llama-perplexity's usual 512, or less for a model trained on less
    n_ctx = min(DEFAULT_CTX, int(header.get("context_length", DEFAULT_CTX) or DEFAULT_CTX))
    files: dict[str, Path] = {}
    steps, done = len(candidates) * 2 + reps * len(candidates), 0
    for q in candidates:
        if q == ref_quant:
            files[q] = reference
        else:
            files[q] = workdir / f"{q.lower()}.gguf"
            runtime.quantize(reference, files[q], QUANTS[q].ftype, nthread=n_threads or 0,
                             allow_requantize=True, imatrix=imatrix)
        done += 1
        if progress:
            progress(done, steps, f"quantize {q}")
    quality = {}
    for q in candidates:
        quality[q] = evaluate(files[q], reference=reference, n_threads=n_threads, n_ctx=n_ctx)
        done += 1
        if progress:
            progress(done, steps, f"KL {q}")
    base = done

    def on_bench(d: int, _total: int, what: str) -> None:
        if progress:
            progress(base + d, steps, f"speed {what}")

    speed = bench.bench([str(files[q]) for q in candidates], prompt_tokens=128, gen_tokens=32, reps=reps,
                        n_threads=n_threads, progress=on_bench)
    rows = [Measured(q, files[q].stat().st_size, quality[q].kl_mean or 0.0, quality[q].kl_p99 or 0.0,
                     quality[q].top1_agreement or 0.0, quality[q].perplexity, s.prompt_tps["median"],
                     s.gen_tps["median"]) for q, s in zip(candidates, speed)]
    return rows, files


def choose(reference: str | os.PathLike[str], workdir: str | os.PathLike[str], *, max_kl: float = DEFAULT_MAX_KL,
           candidates: Sequence[str] = CANDIDATES, n_threads: int | None = None, reps: int = 2,
           progress: Progress | None = None, imatrix: dict[str, Any] | None = None) -> tuple[Decision, dict[str, Path]]:
    """Measure the candidates and decide. The caller keeps the chosen file
    (``files[decision.quant]``) and removes ``workdir``."""
    from localllm import validate

    max_kl = check_max_kl(max_kl)
    unknown = [q for q in candidates if q not in CANDIDATES]
    if unknown or not candidates:
        raise InvalidArgumentError(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}",
                                   param="candidates")
    reference = Path(reference)
    rows, files = measure(reference, Path(workdir), candidates=candidates, n_threads=n_threads, reps=reps,
                          progress=progress, imatrix=imatrix)
    quant, reason = decide(rows, max_kl)
    return Decision(quant, reason, max_kl, validate.read_header(reference).quant, _cpu(), "measured", rows), files


__all__ = ["CANDIDATES", "DEFAULT_MAX_KL", "Measured", "Decision", "decide", "measure", "choose", "check_max_kl"]
