"""``convert --quant auto`` (localllm/autoquant.py): the fastest candidate within the KL budget,
the most precise when none is, the table recorded in the store manifest."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest

from localllm.autoquant import CANDIDATES
from tests.helpers import cli

_cli = partial(cli, timeout=900)  # a conversion that measures every candidate: minutes on 2 cores


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tests.convert_fixtures import build_checkpoint

    return build_checkpoint("llama", tmp_path_factory.mktemp("autoq") / "tiny")


def test_quant_auto_with_an_impossible_budget_keeps_the_most_precise(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """--max-kl 0: no quant is exact, so the candidate with the smallest measured KL is kept, and
    the output says why; the table goes into the store manifest."""
    env = {"LOCALLLM_HOME": str(tmp_path / "home")}
    p = _cli("convert", str(tiny_checkpoint), "--name", "tiny", "--quant", "auto", "--max-kl", "0", "-q", env=env)
    assert p.returncode == 0, p.stderr
    vdirs = list((tmp_path / "home" / "models" / "tiny").iterdir())
    assert len(vdirs) == 1
    m = json.loads((vdirs[0] / "manifest.json").read_text())
    choice = m["quant_choice"]
    rows = {r["quant"]: r for r in choice["rows"]}
    assert list(rows) == list(CANDIDATES)
    assert all(r["kl_mean"] > 0 for r in rows.values())
    best = min(rows.values(), key=lambda r: r["kl_mean"])["quant"]
    assert choice["quant"] == best and vdirs[0].name == best.lower() and m["quant"] == best
    assert "no candidate is within the KL budget 0" in p.stdout
    assert f"chose {best}" in p.stdout
    # the table printed is the table recorded, with the CPU it was measured on
    assert choice["cpu"]["flags"] and choice["source"] == "measured"
    for q, r in rows.items():
        assert any(line.split()[:1] == [q] and f"{r['kl_mean']:.5f}" in line for line in p.stdout.splitlines())
    # nothing left behind but the chosen entry
    assert not [f for f in (tmp_path / "home" / "models").rglob("*") if ".localllm-auto" in str(f)]


def test_quant_auto_picks_the_fastest_within_budget_to_a_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.gguf"
    p = _cli("convert", str(tiny_checkpoint), "-o", str(out), "--quant", "auto", "--max-kl", "10", "-q")
    assert p.returncode == 0, p.stderr
    table = [ln.split() for ln in p.stdout.splitlines() if ln.strip().split()[:1] and ln.split()[0] in CANDIDATES]
    assert len(table) == len(CANDIDATES)
    turn = {r[0]: float(r[7]) for r in table}
    chosen = next(r[0] for r in table if "<-" in r)
    # every candidate is within a budget of 10 nats: the fastest, or one within SPEED_TIE of it (the table
    # shows 2 decimals, so each side may be off by half a unit)
    from localllm.autoquant import SPEED_TIE

    assert turn[chosen] - 0.005 <= (min(turn.values()) + 0.005) * (1 + SPEED_TIE), (chosen, turn)
    # a row left unscored is slower than the choice could be tied with; the scored ones show their KL
    for r in table:
        if "slower:" in r:
            assert r[2:5] == ["-", "-", "-"] and turn[r[0]] + 0.005 >= turn[chosen] * (1 + SPEED_TIE), (r, turn)
        else:
            assert float(r[2]) >= 0
    assert any(ln.startswith("took ") and "quantize" in ln and "quality" in ln for ln in p.stdout.splitlines())
    from localllm import validate

    assert validate.read_header(out).quant == chosen
    assert sorted(os.listdir(tmp_path)) == ["out.gguf"]   # no work folder left


def test_max_kl_without_auto_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    p = _cli("convert", str(tiny_checkpoint), "-o", str(tmp_path / "x.gguf"), "--quant", "Q8_0", "--max-kl", "0.1")
    assert p.returncode == 1 and "--max-kl needs --quant auto" in p.stderr
    p = _cli("convert", str(tiny_checkpoint), "-o", str(tmp_path / "x.gguf"), "--quant", "Q8_0", "--measure-all")
    assert p.returncode == 1 and "--measure-all needs --quant auto" in p.stderr
    assert not (tmp_path / "x.gguf").exists()



def test_scoring_fastest_first_chooses_as_scoring_all() -> None:
    """Candidates slower than the choice are not scored (minutes saved at 1B): on random tables the
    lazy walk must choose what scoring every candidate chooses, and score no candidate it skips past."""
    import random

    from localllm.autoquant import Measured, _score_until_settled, decide

    rng = random.Random(0)
    skipped_some = 0
    for _ in range(2000):
        qs = rng.sample(CANDIDATES, rng.randint(1, len(CANDIDATES)))
        kl = {q: rng.choice([0.0, rng.random() * 0.1]) for q in qs}
        speed = {q: (rng.uniform(50, 60), rng.uniform(10, 11)) for q in qs}
        max_kl = rng.choice([0.0, 0.02, 0.05, 1.0])
        full = [Measured(q, 1, kl[q], 0.0, 1.0, 1.0, *speed[q]) for q in qs]
        scored: list[str] = []

        def kl_of(q: str) -> float:
            scored.append(q)
            return kl[q]

        _score_until_settled({r.quant: r.turn_s for r in full}, max_kl, kl_of, measure_all=False)
        lazy = [r if r.quant in scored else Measured(r.quant, 1, None, None, None, None, r.prompt_tps, r.gen_tps)
                for r in full]
        assert decide(lazy, max_kl)[0] == decide(full, max_kl)[0]
        assert len(scored) == len(set(scored))
        skipped_some += len(scored) < len(qs)
        all_scored: list[str] = []
        _score_until_settled({r.quant: r.turn_s for r in full}, max_kl, lambda q: all_scored.append(q) or kl[q],
                          measure_all=True)
        assert sorted(all_scored) == sorted(qs)
    assert skipped_some > 500   # the saving is real, not a walk that scores everything
    from localllm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="no candidate was scored"):
        decide([Measured("Q8_0", 1, None, None, None, None, 50.0, 10.0)], 0.05)
