"""The default model's version is chosen for this CPU: from the measured table
when it has this feature set, else by measuring on first use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from localllm import catalog, store, resolve

B = catalog.BUILTIN[catalog.DEFAULT_MODEL]


def test_feature_sets() -> None:
    f = dict.fromkeys(("avx2", "fma", "avx512f", "avx512_bf16", "amx_int8", "neon", "dotprod"), False)
    assert catalog.feature_set(f) == "baseline"
    assert catalog.feature_set({**f, "avx2": True, "fma": True}) == "avx2"
    assert catalog.feature_set({**f, "avx2": True, "fma": True, "avx512f": True}) == "avx512"
    assert catalog.feature_set({**f, "avx512f": True, "avx512_bf16": True}) == "avx512_bf16"
    assert catalog.feature_set({**f, "amx_int8": True, "avx512f": True}) == "amx"
    assert catalog.feature_set({**f, "neon": True, "dotprod": True}) == "arm_dotprod"


def test_table_rows_are_complete_decisions() -> None:
    """Every row names a version the catalog has, within its own budget or the most precise, with its evidence."""
    from localllm.autoquant import Measured, decide

    table = catalog.quant_table()
    assert table, "localllm/data/quant_table.json is empty: run python benchmarks/default_choice.py"
    for name, rows in table.items():
        for key, e in rows.items():
            assert e["quant"].lower() in catalog.BUILTIN[name].versions
            assert e["feature_set"] == key and e["cpu"]["flags"] and e["command"].startswith("python benchmarks/")
            measured = [Measured(**{k: r[k] for k in Measured.__dataclass_fields__}) for r in e["rows"]]
            assert decide(measured, e["max_kl"])[0] == e["quant"]   # the recorded choice follows from its table


def test_first_use_takes_the_table_row_and_remembers_it(tmp_path: Path) -> None:
    key = catalog.feature_set()
    entry = catalog.quant_table().get(B.name, {}).get(key)
    if entry is None:
        pytest.skip(f"the table has no row for this CPU's feature set {key!r} (first use measures instead)")
    root = tmp_path / "models"
    notes: list[str] = []
    path = resolve.resolve(None, models_dir=root, notes=notes)
    assert path.parent.name == entry["quant"].lower()
    assert len(notes) == 1 and f"from the table measured on {key} CPUs" in notes[0]
    m = json.loads((path.parent / "manifest.json").read_text())
    assert m["quant_choice"]["source"] == f"table:{key}" and m["quant_choice"]["quant"] == entry["quant"]
    assert m["quant"] == entry["quant"]
    # the next resolve finds it without a note, by name too
    again: list[str] = []
    assert resolve.resolve(B.name, models_dir=root, notes=again) == path and again == []
    # a store moved to a CPU of another feature set chooses again
    (root / B.name / "auto.json").write_text(json.dumps({"version": "q4_1", "feature_set": "elsewhere"}))
    moved: list[str] = []
    assert resolve.resolve(None, models_dir=root, notes=moved) == path and len(moved) == 1
    # an explicit version is exactly that version
    assert resolve.resolve(f"{B.name}:q4_1", models_dir=root).parent.name == "q4_1"


def test_first_use_measures_when_the_table_lacks_this_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No row for this CPU: the candidates are really measured here (two of them, to keep the suite short)."""
    monkeypatch.setattr(catalog, "quant_table", lambda: {})
    monkeypatch.setattr(resolve, "auto_candidates", lambda b: ["Q8_0", "Q4_0"])
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path / "home"))
    root = tmp_path / "models"
    notes: list[str] = []
    path = resolve.resolve(None, models_dir=root, notes=notes)
    assert len(notes) == 1 and "measured on this CPU" in notes[0]
    choice = json.loads((path.parent / "manifest.json").read_text())["quant_choice"]
    rows = {r["quant"]: r for r in choice["rows"]}
    assert set(rows) == {"Q8_0", "Q4_0"} and choice["source"] == "measured"
    # requantizing the shipped 4-bit file to Q4_0 loses far more than Q8_0 does (tests/measure/test_eval.py measures it)
    assert rows["Q8_0"]["kl_mean"] < choice["max_kl"] < rows["Q4_0"]["kl_mean"]
    assert choice["quant"] == "Q8_0" == path.parent.name.upper()
    assert json.loads((root / B.name / "auto.json").read_text())["version"] == "q8_0"
    assert not list(root.glob(".localllm-auto-*")) and not list(root.glob(".tmp-*"))
