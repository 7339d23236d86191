"""The examples in the package's docstrings run (those not marked +SKIP, which
need a model file). In a subprocess: some examples set environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT


def test_docstring_examples_run(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--doctest-modules",
                        "localllm", "-o", "addopts=", "-o", "testpaths=", "--rootdir", str(ROOT)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "LOCALLLM_HOME": str(tmp_path)})
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout.splitlines()[-1]
