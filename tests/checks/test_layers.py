"""The layers of localllm, each importing only downward, and no import circles: the one list of layers
(``LAYERS``, shown in docs/architecture.md) and the check of every import in the package, those inside
functions included. A lower layer that imports a higher one, a door that imports another door, or
modules that import each other, in any number of steps, fail here."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
while not (ROOT / "localllm").is_dir():  # the file may sit in a subfolder of tests/
    ROOT = ROOT.parent

# bottom to top: a module may import its own layer (without circles) and the layers below it.
# A name ending in "*" covers a package and everything in it.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "settings", "formats", "progress", "hardware", "catalog", "hftok", "textstream"]),
    ("runtime", ["runtime*"]),
    ("checks", ["validate", "plan", "placement", "store", "doctor"]),
    ("core", ["chat", "prompting", "tools", "sampling", "embeddings", "rerank", "loader", "core*"]),
    ("measure", ["bench", "evaluate", "autoquant", "converter*", "archs*"]),
    ("resolve", ["resolve", "hub"]),
    ("doors", ["model", "server*", "cli*", "__main__"]),
]
# the doors never import each other, except the CLI, which starts the server and runs Model
DOORS: dict[str, set[str]] = {"model": set(), "server": set(), "cli": {"server", "model"}, "__main__": {"cli"}}
# `localllm/__init__.py` exports Model lazily (the one named exception); `from localllm import Model`
# elsewhere is an import of localllm.model
PACKAGE_ATTRS = {"Model": "model"}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``store`` → localllm/store.py, ``core`` → localllm/core/__init__.py, ... (names without ``localllm.``)."""
    out = {}
    for f in (root / "localllm").rglob("*.py"):
        parts = f.relative_to(root / "localllm").with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module of the package that ``name`` imports, anywhere in the file. ``from P import X``
    imports P (its ``__init__`` runs) and X where X is a module."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            heads = [a.name for a in node.names]
            subs: list[str] = []
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1] if node.level > 1 else pkg
                head = ".".join(["localllm", *base, *([node.module] if node.module else [])])
            else:
                head = node.module or ""
            heads = [head]
            subs = [f"{head}.{a.name}" for a in node.names]
            if head == "localllm":
                subs += [f"localllm.{PACKAGE_ATTRS[a.name]}" for a in node.names if a.name in PACKAGE_ATTRS]
        else:
            continue
        for m in heads + subs:
            if m.startswith("localllm.") and m[len("localllm."):] in known:
                out.add(m[len("localllm."):])
    out.discard(name)
    return out


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods) - {""}
    return {m: imports(m, f, known) for m, f in mods.items() if m}   # "" is localllm/__init__.py


def layer_of(module: str) -> int | None:
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if module == n.rstrip("*") or (n.endswith("*") and module.startswith(n[:-1] + ".")):
                return i
    return None


def circles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def violations(g: dict[str, set[str]]) -> list[str]:
    """Each import that goes up a layer, or from one door to another it may not use."""
    out = []
    for m, targets in sorted(g.items()):
        lm = layer_of(m)
        for t in sorted(targets):
            lt = layer_of(t)
            if lm is None or lt is None:
                continue  # reported by test_every_module_has_a_layer
            if lt > lm:
                out.append(f"{m} ({LAYERS[lm][0]}) imports {t} ({LAYERS[lt][0]})")
            elif LAYERS[lm][0] == "doors" and lt == lm:
                dm, dt = m.split(".")[0], t.split(".")[0]
                if dm != dt and dt not in DOORS.get(dm, set()):
                    out.append(f"door {m} imports door {t}")
    return out


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in graph() if layer_of(m) is None)
    assert not missing, f"modules with no layer: {missing} (add them to LAYERS in {__file__})"


def test_no_import_circles() -> None:
    found = circles(graph())
    assert not found, f"import circles inside localllm (imports inside functions count): {found}"


def test_imports_go_down() -> None:
    bad = violations(graph())
    assert not bad, "imports against the layers (docs/architecture.md):\n" + "\n".join(bad)


def test_the_check_sees_a_seeded_circle_and_upward_import(tmp_path: Path) -> None:
    """The same check on a copy of the package with one bug seeded at a time must go red."""
    import shutil

    shutil.copytree(ROOT / "localllm", tmp_path / "localllm")
    good = graph(tmp_path)
    assert not circles(good) and not violations(good)

    def seeded(module: str, code: str) -> dict[str, set[str]]:
        f = tmp_path / "localllm" / module
        before = f.read_text()
        f.write_text(before + "\n\n" + code + "\n")
        try:
            return graph(tmp_path)
        finally:
            f.write_text(before)

    # an upward import inside a function: the shape of the nine-module circle this check was written for
    g = seeded("store.py", "def _seeded():\n    from localllm import autoquant")
    assert "store (checks) imports autoquant (measure)" in violations(g)
    assert any({"store", "autoquant", "loader"} <= set(c) for c in circles(g)), circles(g)
    # a circle inside one layer
    g = seeded("bench.py", "def _seeded():\n    import localllm.autoquant")
    assert ["autoquant", "bench"] in circles(g) and not violations(g)
    # a door reaching into another door
    g = seeded("server/routes.py", "from localllm import Model")
    assert "door server.routes imports door model" in violations(g)


def test_the_architecture_doc_shows_these_layers() -> None:
    """docs/architecture.md's table lists the same layers, in the same order, with the same modules."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| \*\*(\w+)\*\* \| ([^|]*) \|", text, re.M)
    shown = [(name, re.findall(r"`([^`]+)`", mods)) for name, mods in rows]
    assert shown[::-1] == LAYERS, shown
