"""Hostile GGUF files through every door, in subprocesses.

Hundreds of seeded mutations of two real GGUFs (a tiny test llama and the
shipped SmolLM2 Q4_1; families in ``gguf_fuzz.mutations``) and GGUFs with
hostile chat templates go through:

- the header check and ``Model`` (load, then generate or chat), all of them,
  in one worker subprocess that survives a signal (``gguf_fuzz.run_jobs``);
- ``localllm run``, ``doctor --model``, ``models import`` and
  ``serve --model-path``, as real processes, on a representative subset
  (the first file of each family the check refuses, each one it passes).

Every path ends in a clear localllm error or works; none is killed by a
signal. The results are the table in docs/RELIABILITY.md
(``LOCALLLM_REGEN=1`` rewrites it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import gguf_fuzz as gf
from tests.helpers import ROOT, cli, free_port, write_tiny_llama

DOC = ROOT / "docs" / "RELIABILITY.md"
BEGIN, END = "<!-- fuzz-doors:begin (tests/test_fuzz_doors.py) -->", "<!-- fuzz-doors:end -->"
CRASH = ("signal", "died", "hang")
LOAD_ERRORS = ("InvalidModelFileError", "ModelLoadError", "UnsupportedArchitectureError", "InsufficientMemoryError")


@dataclass
class Fuzz:
    jobs: list[gf.Mutation]
    results: list[dict[str, Any]]
    workers: int
    sources: dict[str, Path]
    seconds: float


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCALLLM_DEBUG", "LOCALLLM_VERBOSE")}
    env["GGML_NO_BACKTRACE"] = "1"  # a crash (there must be none) should not wait for gdb
    return env


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Fuzz:
    from localllm import store, resolve

    tiny = write_tiny_llama(tmp_path_factory.mktemp("fuzz-src") / "tiny.gguf")
    smol = resolve.resolve("smollm2-135m:q4_1")
    sources = {"tiny": tiny, "smol": smol}
    tiny_jobs = gf.mutations(gf.layout(tiny), "tiny") + gf.template_mutations("tiny")
    smol_jobs = gf.mutations(gf.layout(smol), "smol", full=False)
    t = time.monotonic()
    with ThreadPoolExecutor(2) as pool:  # one worker per source: both cores
        a = pool.submit(gf.run_jobs, tiny_jobs, {"tiny": tiny}, env=_env())
        b = pool.submit(gf.run_jobs, smol_jobs, {"smol": smol}, env=_env())
        (ra, wa), (rb, wb) = a.result(), b.result()
    return Fuzz(tiny_jobs + smol_jobs, ra + rb, wa + wb, sources, time.monotonic() - t)


def _rows(fz: Fuzz) -> list[tuple[gf.Mutation, dict[str, Any]]]:
    return list(zip(fz.jobs, fz.results))


def _fmt(d: dict[str, Any]) -> str:
    return f"{d.get('id')} ({d.get('what')}): {d}"


# --------------------------------------------------------------------------- the library doors

def test_at_least_200_seeded_mutations_in_every_family(fuzz: Fuzz) -> None:
    fams = Counter(m.family for m in fuzz.jobs)
    assert len(fuzz.jobs) >= 200
    assert len({m.id for m in fuzz.jobs}) == len(fuzz.jobs)
    for fam in ("truncate", "counts", "lengths", "arrays", "shapes", "offsets", "types", "hparams", "magic",
                "version", "random-header", "random-data", "template", "control"):
        assert fams[fam] >= 1, fam
    # deterministic: the same seeds give the same files
    again = gf.mutations(gf.layout(fuzz.sources["tiny"]), "tiny")
    assert again == [m for m in fuzz.jobs if m.source == "tiny" and m.family != "template"]


def test_no_file_kills_the_process(fuzz: Fuzz) -> None:
    bad = [(m.id, m.what, stage, r[stage]) for m, r in _rows(fuzz) for stage in ("worker", "check", "model")
           if stage in r and r[stage]["outcome"] in CRASH]
    assert not bad, f"{len(bad)} file(s) crashed a door: {bad[:10]}"
    # ...which is not for lack of trying: llama.cpp alone is killed by some of the files the check refuses
    assert all("check" in r and "model" in r for r in fuzz.results)


def test_the_check_refuses_what_it_must(fuzz: Fuzz) -> None:
    bad = []
    for m, r in _rows(fuzz):
        if m.expect == "reject" and not (r["check"]["outcome"] == "reject"
                                         and re.search(m.reason, r["check"]["reason"] or "")):
            bad.append((m.id, m.what, m.reason, r["check"]))
    assert not bad, f"{len(bad)} wrong verdict(s): {bad[:10]}"


def test_every_model_error_is_a_clear_localllm_error(fuzz: Fuzz) -> None:
    bad = []
    for m, r in _rows(fuzz):
        check, model = r["check"], r["model"]
        if check["outcome"] == "reject":
            # refused before llama.cpp: the same error, word for word
            if (model.get("class"), model.get("message")) != (check["class"], check["message"]):
                bad.append((m.id, "differs from the check", check, model))
        elif model["outcome"] == "error":
            if not model["localllm"] or model["class"] == "LocalLLMError":
                bad.append((m.id, "not a specific localllm error", model))
            elif model["class"] in LOAD_ERRORS and not (model["names_file"] and model["hint"]):
                bad.append((m.id, "does not name the file and a next step", model))
            elif "failed to load model)" in model["message"] or model["message"].endswith("(no log)"):
                bad.append((m.id, "llama.cpp's generic message", model))
        elif model["outcome"] != "ok":
            bad.append((m.id, "no verdict", model))
    assert not bad, f"{len(bad)} unclear error(s): {bad[:10]}"


def test_what_must_load_loads(fuzz: Fuzz) -> None:
    must = [(m, r) for m, r in _rows(fuzz) if m.expect == "load"]
    assert len(must) >= 8
    bad = [(m.id, m.what, r) for m, r in must if r["check"]["outcome"] != "pass" or r["model"]["outcome"] != "ok"]
    assert not bad, bad


def test_passing_the_check_means_loading_or_a_clear_error(fuzz: Fuzz) -> None:
    c = counts(fuzz)
    assert c["check_pass"] + c["check_reject"] == len(fuzz.jobs) - c["templates"]
    assert c["pass_crash"] == 0
    assert c["pass_ok"] + c["pass_error"] == c["check_pass"]
    # every refused file was also handed to llama.cpp alone, for the record in docs/RELIABILITY.md
    assert c["raw_signal"] + c["raw_loaded"] + c["raw_error"] == c["check_reject"]


def test_hostile_templates_are_refused_in_bounded_time(fuzz: Fuzz) -> None:
    rows = [(m, r) for m, r in _rows(fuzz) if m.family == "template"]
    assert len(rows) == len(gf.HOSTILE_TEMPLATES) + 1
    for m, r in rows:
        model = r["model"]
        if m.expect == "load":
            assert model["outcome"] == "ok" and model["template"] == "gguf", (m.what, model)
            continue
        assert model["outcome"] == "error" and model["class"] == "TemplateError", (m.what, model)
        assert re.search(m.reason, model["message"]), (m.what, m.reason, model["message"])
        assert len(model["message"]) < 300, (m.what, model["message"])


def test_template_bounds_spare_real_conversations(monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import chat

    # a conversation larger than the fixed limit still renders: the limit grows with the input
    big = "word " * (chat.SIZE_LIMIT // 4)
    text = chat.render_chat(chat.CHATML, [{"role": "user", "content": big}])
    assert text == f"<|im_start|>user\n{big}<|im_end|>\n<|im_start|>assistant\n"
    # a deadline that fired is withdrawn: nothing is raised later, in unrelated code
    monkeypatch.setattr(chat, "RENDER_TIMEOUT_S", 0.3)
    with pytest.raises(chat.TemplateError, match="took too long"):
        chat.render_chat("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
                         [{"role": "user", "content": "hi"}])
    assert chat.render_chat(chat.CHATML, [{"role": "user", "content": "hi"}]).startswith("<|im_start|>user")
    end = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < end:  # pure Python for longer than the deadline: must not be interrupted
        n += 1
    assert n > 0


def counts(fz: Fuzz) -> Counter[str]:
    c: Counter[str] = Counter()
    for m, r in _rows(fz):
        if m.family == "template":
            c["templates"] += 1
            continue
        ch, mo = r["check"]["outcome"], r["model"]["outcome"]
        c["check_pass" if ch == "pass" else "check_reject"] += 1
        if ch == "pass":
            c["pass_ok" if mo == "ok" else "pass_crash" if mo in CRASH else "pass_error"] += 1
        else:
            raw = r.get("raw", {}).get("outcome")
            c["raw_loaded" if raw == "loaded" else "raw_signal" if raw in CRASH else "raw_error"] += 1
            if raw == "error" and r["raw"]["class"] == "ModelLoadError":
                c["raw_generic"] += 1
    return c


# --------------------------------------------------------------------------- the CLI doors

def _cli(args: list[str], timeout: float = 120) -> dict[str, Any]:
    r = cli(*args, env={"LOCALLLM_VERBOSE": None, "GGML_NO_BACKTRACE": "1"},  # the environment of _env()
            timeout=timeout, stdin=subprocess.DEVNULL)
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def _serve(path: Path, timeout: float = 120) -> dict[str, Any]:
    """``serve --model-path``: it must exit with an error, or serve (then /health is checked and it is stopped)."""
    from tests.serverutil import get

    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "localllm", "serve", "--model-path", str(path), "--port", str(port),
                          "--parallel", "1", "--ctx", "128", "--threads", "1"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL)
    health = None
    end = time.monotonic() + timeout
    while p.poll() is None and time.monotonic() < end:
        try:
            h = get(f"http://127.0.0.1:{port}/health", timeout=5)
            if h.status_code == 200:
                health = h.status_code
                break
        except OSError:
            pass
        time.sleep(0.2)
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    try:
        out, err = p.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
    return {"rc": p.returncode, "stdout": out, "stderr": err, "health": health}


def _subset(fz: Fuzz) -> list[int]:
    """One file per family the check refuses, and every kind of file it passes (one per family and verdict)."""
    picked, seen = [], set()
    for i, (m, r) in enumerate(_rows(fz)):
        if m.source != "tiny":
            continue
        key = (m.family, r["check"]["outcome"], r["model"]["outcome"])
        if key not in seen:
            seen.add(key)
            picked.append(i)
    return picked


@pytest.fixture(scope="module")
def cli_results(fuzz: Fuzz, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, dict[str, Any]]]:
    work = tmp_path_factory.mktemp("fuzz-cli")

    def one(i: int) -> tuple[int, dict[str, dict[str, Any]]]:
        m = fuzz.jobs[i]
        path = gf.materialize(m, fuzz.sources[m.source], work / f"{m.id.replace('/', '-')}.gguf")
        prompt = ["hi"] if m.chat else ["the cat", "--raw"]
        out = {
            "run": _cli(["run", str(path), *prompt, "-n", "2", "--temp", "0", "--ctx", "128", "--threads", "1"]),
            "doctor": _cli(["doctor", "--model", str(path)]),
            "import": _cli(["models", "import", str(path), "--name", "fuzz", "--models-dir", str(work / f"store{i}")]),
            "serve": _serve(path),
        }
        for d in out.values():
            for k in ("stdout", "stderr"):
                d[k] = d[k].replace(str(path), "FILE")
        return i, out

    with ThreadPoolExecutor(2) as pool:
        return dict(pool.map(one, _subset(fuzz)))


def _line(d: dict[str, Any]) -> str:
    return f"error: {d['message']}" + (f" (next: {d['hint']})" if d.get("hint") else "")


def test_cli_doors_end_in_one_clear_line(fuzz: Fuzz, cli_results: dict[int, dict[str, dict[str, Any]]]) -> None:
    assert len(cli_results) >= 14
    bad = []
    for i, doors in cli_results.items():
        m, r = fuzz.jobs[i], fuzz.results[i]
        check, model = r["check"], r["model"]
        for door, d in doors.items():
            lines = d["stderr"].strip().splitlines()
            if d["rc"] < 0 or "Traceback" in d["stderr"] or "internal error" in d["stderr"]:
                bad.append((m.id, door, "crashed", d))
                continue
            if check["outcome"] == "reject":  # every door refuses it the same way, in one line
                if d["rc"] != 1 or lines != [_line(check)]:
                    bad.append((m.id, door, "expected", _line(check), d))
            elif door == "run":
                want = (0, None) if model["outcome"] == "ok" else (1, [_line(model)])
                if (d["rc"], lines if want[1] else None) != want:
                    bad.append((m.id, door, "expected", want, d))
            elif door == "import":  # the header is all import reads
                if d["rc"] != 0 or not d["stdout"].startswith("imported fuzz:"):
                    bad.append((m.id, door, "expected an import", d))
            elif door == "doctor":  # plans from the header: a report (exit 1 only for machine problems)
                if d["rc"] not in (0, 1) or "Model" not in d["stdout"]:
                    bad.append((m.id, door, "expected a report", d))
            elif door == "serve":
                if model["outcome"] == "ok":
                    if d["health"] != 200:
                        bad.append((m.id, door, "expected to serve", d))
                elif model["class"] in LOAD_ERRORS:  # must not serve a model that cannot load
                    if d["rc"] != 1 or d["health"] is not None or not lines or lines[-1] != _line(model):
                        bad.append((m.id, door, "expected to exit with", _line(model), d))
    assert not bad, f"{len(bad)} door(s) misbehaved: {bad[:6]}"


# --------------------------------------------------------------------------- docs/RELIABILITY.md

def _short(d: dict[str, Any] | None, n: int = 90) -> str:
    if not d:
        return "–"
    o = d["outcome"]
    if o in ("pass", "ok", "loaded"):
        return o
    if o in CRASH:
        return f"**{o} {d.get('signal', d.get('rc', ''))}**".strip()
    text = d.get("reason") or d["message"].replace("FILE: ", "")
    text = re.sub(r"\s+", " ", text).replace("|", "\\|")
    text = text if len(text) <= n else text[:n - 1] + "…"
    return f"{'refused' if o == 'reject' else d['class']}: {text}"


def _cli_cell(doors: dict[str, dict[str, Any]] | None) -> str:
    """Each door's verdict in a word (doctor's exit status also depends on the machine, so not that)."""
    if not doors:
        return ""
    words = []
    for k, d in doors.items():
        ok = "served" if d.get("health") == 200 else "report" if k == "doctor" and d["rc"] in (0, 1) and \
            "Model" in d["stdout"] else "ok" if d["rc"] == 0 else f"exit {d['rc']}"
        words.append(f"{k}: {ok}")
    return ", ".join(words)


def render_table(fz: Fuzz, cli: dict[int, dict[str, dict[str, Any]]]) -> str:
    c = counts(fz)
    fams = Counter(m.family for m in fz.jobs)
    out = [
        BEGIN,
        "",
        f"{len(fz.jobs)} cases ({len(fz.jobs) - c['templates']} mutated files: "
        f"{sum(m.source == 'tiny' for m in fz.jobs) - c['templates']} of a tiny test llama, "
        f"{sum(m.source == 'smol' for m in fz.jobs)} of the shipped SmolLM2 Q4_1; {c['templates']} chat templates). "
        "Families: " + ", ".join(f"{k} {v}" for k, v in sorted(fams.items())) + ".",
        "",
        "| | files |",
        "|---|---|",
        f"| refused by the header check (the same one-line error from every door) | {c.get('check_reject', 0)} |",
        f"| ... of which llama.cpp alone (no check) would have been **killed by a signal** | {c.get('raw_signal', 0)} |",
        f"| ... of which llama.cpp alone would have loaded without a word | {c.get('raw_loaded', 0)} |",
        f"| ... of which llama.cpp alone refuses too | {c.get('raw_error', 0)} |",
        f"| passed the check and loaded (and generated) | {c.get('pass_ok', 0)} |",
        f"| **passed the check, yet failed to load** (a clear error naming llama.cpp's reason) | "
        f"{c.get('pass_error', 0)} |",
        f"| passed the check, then crashed a door | {c.get('pass_crash', 0)} |",
        "",
        f"CLI doors (`run`, `doctor --model`, `models import`, `serve --model-path`) ran on {len(cli)} "
        "files: the first of each family and verdict (`exit 1`: the one-line error, the same as `Model`'s).",
        "",
        "| case | mutation | header check | `Model` | llama.cpp alone | CLI doors |",
        "|---|---|---|---|---|---|",
    ]
    for i, (m, r) in enumerate(_rows(fz)):
        what = m.what.replace("|", "\\|")
        out.append(f"| {m.id} | {what} | {_short(r.get('check'))} | {_short(r.get('model'))} | "
                   f"{_short(r.get('raw'), 60)} | {_cli_cell(cli.get(i))} |")
    out += ["", END]
    return "\n".join(out)


def test_reliability_doc_lists_every_case(fuzz: Fuzz, cli_results: dict[int, dict[str, dict[str, Any]]]) -> None:
    table = render_table(fuzz, cli_results)
    text = DOC.read_text() if DOC.exists() else ""
    if os.environ.get("LOCALLLM_REGEN") == "1":
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + table + text[text.index(END) + len(END):]
        else:
            text = (text or "# Reliability\n") + "\n## Hostile model files\n\n" + table + "\n"
        DOC.write_text(text)
    assert BEGIN in text and END in text, "docs/RELIABILITY.md has no fuzz table: rerun with LOCALLLM_REGEN=1"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    if current != table:
        old, new = current.splitlines(), table.splitlines()
        diff = [f"- {a}\n+ {b}" for a, b in zip(old, new) if a != b][:5]
        pytest.fail("docs/RELIABILITY.md's fuzz table differs from what the harness ran "
                    f"({len(old)} vs {len(new)} lines); regenerate with "
                    "LOCALLLM_REGEN=1 pytest tests/doors/test_fuzz_doors.py. First differences:\n" + "\n".join(diff))
