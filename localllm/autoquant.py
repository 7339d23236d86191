"""``--quant auto``: choose the weight type by measurement on this machine.

From a lossless reference GGUF (the checkpoint's own 16-bit type, else F32),
llama.cpp quantizes each candidate; each is timed (:func:`localllm.bench.bench`,
side by side), then scored for quality (KL divergence from the reference on
the evaluation text, :func:`localllm.evaluate.evaluate`) fastest first, until
the choice is settled. The choice is the fastest candidate whose mean KL is
within the budget, "fastest" meaning the shortest typical request
(``bench.TURN_PROMPT`` prompt tokens read plus ``bench.TURN_GEN`` generated).
Candidates within ``SPEED_TIE`` (3 %) of the fastest count as equally fast,
and the most precise of them wins. No candidate within the budget → the most
precise one, and the reason says so. Candidates slower than the choice cannot
change it and are not scored (``measure_all`` scores them): that, and the
16-bit reference in place of F32, keep a 1B model to about ten minutes on
2 cores (docs/convert.md, "Choosing by measurement", has the run).

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

from localllm.errors import InvalidArgumentError
from localllm.formats import QUANTS
from localllm.progress import Progress

if TYPE_CHECKING:
    from localllm.converter.pipeline import ConvertResult

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
    kl_mean: float | None       # None: not scored (slower than the choice: it could not change it)
    kl_p99: float | None
    top1: float | None
    perplexity: float | None
    prompt_tps: float
    gen_tps: float

    @property
    def turn_s(self) -> float:
        from localllm.bench import turn_seconds

        return turn_seconds(self.prompt_tps, self.gen_tps)


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
    seconds: dict[str, float] = field(default_factory=dict)   # per phase: quantize, speed, quality

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
            if r.kl_mean is None:
                mark, kl = "  slower: not scored", f"{'-':>9} {'-':>8} {'-':>6}"
            else:
                mark = "  <- chosen" if r.quant == self.quant else ("" if r.kl_mean <= self.max_kl else "  over budget")
                kl = f"{r.kl_mean:>9.5f} {r.kl_p99 or 0.0:>8.4f} {100 * (r.top1 or 0.0):>5.1f}%"
            out.append(f"{r.quant:<8} {r.size_bytes / 2**20:>9.1f} {kl} {r.prompt_tps:>10.1f} {r.gen_tps:>8.1f} "
                       f"{r.turn_s:>17.2f}{mark}")
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
    scored = [r for r in rows if r.kl_mean is not None]
    if not scored:
        raise InvalidArgumentError("no candidate was scored against the reference", param="quant")
    within = [r for r in scored if (r.kl_mean or 0.0) <= max_kl]
    if not within:
        best = min(scored, key=lambda r: r.kl_mean or 0.0)
        return best.quant, (f"no candidate is within the KL budget {max_kl:g} (the smallest KL is "
                            f"{best.kl_mean:.4g}, {best.quant}): chose the most precise")
    best = min(r.turn_s for r in within)
    tied = [r for r in within if r.turn_s <= best * (1 + SPEED_TIE)]
    pick = min(tied, key=lambda r: r.kl_mean or 0.0)
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


def _quantize_all(reference: Path, workdir: Path, candidates: Sequence[str], n_threads: int | None,
                  imatrix: dict[str, Any] | None, tick: Callable[[str], None]) -> dict[str, Path]:
    from localllm import runtime, validate

    ref_quant = validate.read_header(reference).quant
    files: dict[str, Path] = {}
    for q in candidates:
        if q == ref_quant:
            files[q] = reference
        else:
            files[q] = workdir / f"{q.lower()}.gguf"
            runtime.quantize(reference, files[q], QUANTS[q].ftype, nthread=n_threads or 0,
                             allow_requantize=True, imatrix=imatrix)
        tick(f"quantize {q}")
    return files


def _score_until_settled(turn: dict[str, float], max_kl: float, kl_of: Callable[[str], float],
                      measure_all: bool) -> None:
    """Call ``kl_of`` on the candidates, fastest first, until the choice is settled: the first one
    within ``max_kl`` and every one within SPEED_TIE of its speed (a more precise one among those
    wins). The slower ones cannot change the choice, so they are not scored (``measure_all``: all)."""
    best: float | None = None
    for q in sorted(turn, key=turn.__getitem__):
        if best is not None and turn[q] > best * (1 + SPEED_TIE) and not measure_all:
            break
        if kl_of(q) <= max_kl and best is None:
            best = turn[q]


def measure(reference: Path, workdir: Path, *, candidates: Sequence[str] = CANDIDATES, n_threads: int | None = None,
            reps: int = 2, progress: Progress | None = None, imatrix: dict[str, Any] | None = None,
            max_kl: float = DEFAULT_MAX_KL, measure_all: bool = False) -> tuple[list[Measured], dict[str, Path],
                                                                               dict[str, float]]:
    """Quantize every candidate from ``reference`` into ``workdir``, time each (side by side), and
    score against the reference those that can decide (:func:`_score_until_settled`). Returns the
    rows (in ``candidates`` order; ``kl_mean`` None where not scored), the candidate files and the
    seconds each phase took."""
    from localllm import bench, validate
    from localllm.evaluate import DEFAULT_CTX, evaluate

    header = validate.read_header(reference)
    # the evaluation window: llama-perplexity's usual 512, or less for a model trained on less
    n_ctx = min(DEFAULT_CTX, int(header.get("context_length", DEFAULT_CTX) or DEFAULT_CTX))
    steps, done, clock = len(candidates) * (2 + reps), 0, time.perf_counter()
    seconds: dict[str, float] = {}

    def tick(what: str, n: int = 1) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, steps, what)

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = now - clock
        clock = now

    files = _quantize_all(reference, workdir, candidates, n_threads, imatrix, tick)
    phase("quantize")
    base = done
    speed = dict(zip(candidates, bench.bench(
        [str(files[q]) for q in candidates], prompt_tokens=128, gen_tokens=32, reps=reps, n_threads=n_threads,
        progress=(lambda d, _t, what: progress(base + d, steps, f"speed {what}")) if progress else None)))
    done = base + reps * len(candidates)
    phase("speed")
    quality: dict[str, Any] = {}

    def kl_of(q: str) -> float:
        if files[q] == reference:   # the reference against itself: exactly 0 (evaluate's grid)
            quality[q] = None
        else:
            quality[q] = evaluate(files[q], reference=reference, n_threads=n_threads, n_ctx=n_ctx)
        tick(f"KL {q}")
        return (quality[q].kl_mean or 0.0) if quality[q] is not None else 0.0   # as _row reads it

    turn = {q: s.turn_seconds() for q, s in speed.items()}
    _score_until_settled(turn, max_kl, kl_of, measure_all)
    tick("KL: the rest cannot change the choice", len(candidates) - len(quality))
    phase("quality")
    ref_ppl = next((r.reference_perplexity for r in quality.values() if r is not None), None)
    rows = [_row(q, files[q], q in quality, quality.get(q), ref_ppl, speed[q]) for q in candidates]
    return rows, files, seconds


def _row(q: str, path: Path, scored: bool, r: Any, ref_ppl: float | None, s: Any) -> Measured:
    if not scored:
        kl, p99, top1, ppl = None, None, None, None
    elif r is None:   # the reference itself
        kl, p99, top1, ppl = 0.0, 0.0, 1.0, ref_ppl
    else:
        kl, p99, top1, ppl = r.kl_mean or 0.0, r.kl_p99 or 0.0, r.top1_agreement or 0.0, r.perplexity
    return Measured(q, path.stat().st_size, kl, p99, top1, ppl, s.prompt_tps["median"], s.gen_tps["median"])


def choose(reference: str | os.PathLike[str], workdir: str | os.PathLike[str], *, max_kl: float = DEFAULT_MAX_KL,
           candidates: Sequence[str] = CANDIDATES, n_threads: int | None = None, reps: int = 2,
           progress: Progress | None = None, imatrix: dict[str, Any] | None = None,
           measure_all: bool = False) -> tuple[Decision, dict[str, Path]]:
    """Measure the candidates and decide. The caller keeps the chosen file
    (``files[decision.quant]``) and removes ``workdir``."""
    from localllm import validate

    max_kl = check_max_kl(max_kl)
    unknown = [q for q in candidates if q not in CANDIDATES]
    if unknown or not candidates:
        raise InvalidArgumentError(f"unknown candidates {unknown}; choose from {', '.join(CANDIDATES)}",
                                   param="candidates")
    reference = Path(reference)
    rows, files, seconds = measure(reference, Path(workdir), candidates=candidates, n_threads=n_threads, reps=reps,
                                   progress=progress, imatrix=imatrix, max_kl=max_kl, measure_all=measure_all)
    quant, reason = decide(rows, max_kl)
    return Decision(quant, reason, max_kl, validate.read_header(reference).quant, _cpu(), "measured", rows,
                    seconds), files


@dataclass(frozen=True)
class FromCheckpoint:
    """What :func:`from_checkpoint` did: the reference's conversion, the importance matrix's note,
    the decision, the candidate files (``files[decision.quant]`` is the choice) and its total time."""

    reference: ConvertResult     # the lossless reference's conversion
    imatrix_note: str
    decision: Decision
    files: dict[str, Path]
    seconds: float


def from_checkpoint(src: str | os.PathLike[str], workdir: str | os.PathLike[str], *,
                    max_kl: float = DEFAULT_MAX_KL, strict: bool = False, name: str | None = None,
                    n_threads: int | None = None, imatrix: bool | None = None, measure_all: bool = False,
                    show_progress: bool = False, progress: Progress | None = None) -> FromCheckpoint:
    """``convert --quant auto``: the checkpoint converted losslessly (its own 16-bit type, else F32)
    into ``workdir`` as the reference, an importance matrix, then :func:`choose`.
    ``show_progress``: the conversion's own bar; ``progress``: the measuring steps."""
    from localllm.converter import convert
    from localllm.converter.pipeline import importance_for, lossless_quant

    t0 = time.perf_counter()
    max_kl = check_max_kl(max_kl)
    ref_quant = lossless_quant(src)
    ref = Path(workdir) / f"reference-{ref_quant.lower()}.gguf"
    converted = convert(src, ref, quant=ref_quant, strict=strict, name=name, progress=show_progress,
                        threads=n_threads, imatrix=False)   # written directly: the matrix is for the candidates
    t1 = time.perf_counter()
    imat, note = importance_for(src, imatrix)
    t2 = time.perf_counter()
    decision, files = choose(ref, workdir, max_kl=max_kl, n_threads=n_threads, progress=progress, imatrix=imat,
                             measure_all=measure_all)
    measured = dict(decision.seconds)
    decision.seconds.clear()   # in the order they ran
    decision.seconds.update({"reference": t1 - t0, "imatrix": t2 - t1, **measured})
    return FromCheckpoint(converted, note, decision, files, time.perf_counter() - t0)


__all__ = ["CANDIDATES", "DEFAULT_MAX_KL", "Measured", "Decision", "decide", "measure", "choose", "check_max_kl", "FromCheckpoint", "from_checkpoint"]
