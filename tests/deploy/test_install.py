"""A regular install works: the wheel built from this checkout, installed
(not editable) with the ``[serve]`` extra into a fresh virtual environment,
runs ``localllm serve`` from outside the checkout, and that server answers
``/health`` and one chat completion.

This is what catches a package left out of ``setup.cfg``: the editable
install the other tests use imports straight from the checkout and never
notices. Tests use no network: the fresh venv borrows this environment's
installed dependencies, and the wheel's declared requirements are checked
against them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port


# top-level folders of the checkout that are not source (and models/ is big)
_NOT_SOURCE = {".git", ".venv", "venv", ".tox", "models", "build", "dist", ".localllm",
               ".hypothesis", ".pytest_cache", ".mypy_cache", ".ruff_cache"}

# loopback requests must never go through an http_proxy from the environment
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _copy_source(dst: Path) -> Path:
    """The checkout's source, without build outputs, so that building the
    wheel writes no build/ or *.egg-info into the checkout."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}
        if Path(folder) == ROOT:
            skip |= _NOT_SOURCE & set(names)
        return skip

    shutil.copytree(ROOT, dst, ignore=ignore, symlinks=True)
    return dst


def _can_build_offline() -> bool:
    """setuptools >= 70.1 builds wheels by itself; older ones need ``wheel``."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python or localllm back at the checkout."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV") and not k.startswith("LOCALLLM_")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(extra)
    return env


def _http(method: str, url: str, body: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with _HTTP.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _check_wheel_contents(wheel: Path) -> None:
    """Every package of the checkout is in the wheel: each folder under
    localllm/ with an __init__.py (the architecture rules in localllm/archs/ included)."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {p.relative_to(ROOT).as_posix() for p in (ROOT / "localllm").rglob("*.py")
            if "__pycache__" not in p.parts and (p.parent / "__init__.py").is_file()}
    want.add("localllm/static/chat.html")
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {missing} (a package or data file left out of setup.cfg?)"


_CHECK_REQUIREMENTS = """
from importlib import metadata
from packaging.requirements import Requirement
reqs = [Requirement(r) for r in metadata.requires("localllm")]
core = [r for r in reqs if r.marker is None]
serve = [r for r in reqs if r.marker is not None and r.marker.evaluate({"extra": "serve"})]
names = {r.name.lower().replace("_", "-") for r in core}
assert {"llama-cpp-python", "flask", "gguf", "numpy", "click", "tokenizers"} <= names, names
assert "waitress" in {r.name for r in serve}, serve
for r in core + serve:
    v = metadata.version(r.name)
    assert r.specifier.contains(v, prereleases=True), (str(r), v)
"""


@pytest.mark.slow
def test_wheel_installs_and_serves(tmp_path: Path) -> None:
    from localllm import store, resolve

    model_path = resolve.resolve("smollm2-135m")

    # 1. build the wheel from a copy of the checkout
    src = _copy_source(tmp_path / "src")
    dist = tmp_path / "dist"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)]
    if _can_build_offline():
        build.insert(4, "--no-build-isolation")
    _run(build, timeout=600, env=_clean_env())
    wheels = list(dist.glob("localllm-*.whl"))
    assert len(wheels) == 1, wheels
    _check_wheel_contents(wheels[0])

    # 2. a fresh venv holding the wheel (not editable). Tests use no network, so the
    # dependencies come from this test environment's site-packages, added as a plain path
    # (its own .pth files, the editable install's finder among them, are not run); what the
    # wheel declares is checked against them below
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=300, env=_clean_env())
    vpy = venv / "bin" / "python"
    vsite = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], timeout=60,
                      env=_clean_env()).stdout.strip())
    deps = Path(importlib.util.find_spec("flask").origin).parent.parent  # type: ignore[arg-type]
    (vsite / "zz_test_dependencies.pth").write_text(str(deps) + "\n")
    _run([str(vpy), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheels[0])], timeout=300,
         env=_clean_env())
    # the wheel's metadata declares what localllm and its [serve] extra need, and the versions present satisfy it
    _run([str(vpy), "-c", _CHECK_REQUIREMENTS], timeout=120, cwd=tmp_path, env=_clean_env())

    # 3. nothing of the checkout is importable from there
    work = tmp_path / "work"
    work.mkdir()
    env = _clean_env(LOCALLLM_HOME=str(tmp_path / "home"))
    probe = _run([str(vpy), "-c",
                  "import localllm, localllm.server, localllm.core, waitress\n"
                  "from localllm.converter.rules import all_rules\n"
                  "print(localllm.__file__); print(sorted(all_rules()))"],
                 timeout=120, cwd=work, env=env)
    where, archs = probe.stdout.splitlines()[:2]
    assert Path(where).resolve().is_relative_to(venv.resolve()), where
    assert not Path(where).resolve().is_relative_to(ROOT), where
    assert "LlamaForCausalLM" in archs, archs

    # 4. `localllm serve` from the venv answers /health and one chat completion
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(venv / "bin" / "localllm"), "serve", "--model-path", str(model_path),
                                 "--port", str(port), "--parallel", "1", "--ctx", "256"],
                                cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"localllm serve exited with {proc.returncode}:\n{log.read_text(errors='replace')[-5000:]}")
            try:
                status, body = _http("GET", url + "/health", timeout=5)
            except (urllib.error.URLError, OSError):
                status, body = 0, b""
            if status == 200:
                break
            if status == 503 and json.loads(body).get("status") == "error":
                pytest.fail(f"the model failed to load: {body!r}\n{log.read_text(errors='replace')[-5000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"/health not ready after 120 s (last {status} {body!r}):\n"
                            f"{log.read_text(errors='replace')[-5000:]}")
            time.sleep(0.5)
        assert json.loads(body)["status"] == "ok"

        status, body = _http("POST", url + "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 8, "temperature": 0,
        }, timeout=120)
        assert status == 200, body
        reply = json.loads(body)
        message = reply["choices"][0]["message"]
        assert message["role"] == "assistant"
        assert message["content"].strip(), reply
        assert 1 <= reply["usage"]["completion_tokens"] <= 8, reply["usage"]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
