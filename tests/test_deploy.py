"""Static checks of deploy/ (no Docker engine or cluster on the dev machine)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_copies_files_that_exist_and_builds_portably() -> None:
    text = (ROOT / "deploy" / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
    assert "-DGGML_NATIVE=OFF" in text  # never -march=native in a shared image
    assert '"localllm", "serve", "--host", "0.0.0.0"' in text
    assert "LOCALLLM_HOME" in text and "USER localllm" in text


def test_kubernetes_probes_use_public_health_and_secret_key() -> None:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy" / "kubernetes.yaml").read_text()) if d]
    kinds = {d["kind"] for d in docs}
    assert kinds == {"Secret", "Deployment", "Service"}
    dep = next(d for d in docs if d["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    env = {e["name"]: e for e in c["env"]}
    assert "secretKeyRef" in env["LOCALLLM_API_KEY"]["valueFrom"]
    # the args are real `serve` options
    from click.testing import CliRunner

    from localllm.cli.serve import command

    help_text = CliRunner().invoke(command, ["--help"]).output
    for arg in c["args"]:
        if arg.startswith("--"):
            assert arg in help_text, arg
