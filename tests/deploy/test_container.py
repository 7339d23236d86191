"""The image, built for real and probed: `./test -m container` (kept out of the default run:
building llama.cpp with every CPU variant takes long on a small machine).

No Docker daemon and no registry here. The base is Debian bookworm from `debootstrap
--variant=minbase`, imported with `podman import`; `buildah bud --isolation chroot
--storage-driver vfs --format docker` builds deploy/Dockerfile on it (the docker format
keeps HEALTHCHECK), and `buildah run --isolation chroot` starts the server, which shares
the host's network, so /health is probed on loopback. (`podman run` cannot start here:
setrlimit is not permitted.)

Checked: the image builds with BASE set to that base; `localllm doctor` inside names the
CPU variant it loaded; the server on an empty models volume materialises the baked default
model, /health turns 200, the official openai client gets one chat completion with the API
key (and a 401 without it); SIGTERM drains and the process exits 0.

Environment: LOCALLLM_CONTAINER_KEEP=1 keeps the built image (a second run skips the build).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import ROOT, free_port

pytestmark = [pytest.mark.container, pytest.mark.slow]

STORAGE = ["--storage-driver", "vfs"]
BASE_IMAGE = "localhost/localllm-test-base:bookworm-ca"
IMAGE = "localhost/localllm-test:latest"
TOOLS = {"buildah": "buildah", "podman": "podman", "debootstrap": "debootstrap"}


def _say(msg: str) -> None:
    print(f"[container] {msg}", file=sys.stderr, flush=True)


def _tools() -> None:
    missing = [pkg for exe, pkg in TOOLS.items() if shutil.which(exe) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        _say(f"installing {' '.join(missing)}")
        r = subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True, text=True)
        if r.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], capture_output=True)
    missing = [pkg for exe, pkg in TOOLS.items() if shutil.which(exe) is None]
    if missing:
        reason = f"no image builder: {' '.join(missing)} not installed and cannot be installed here"
        print(reason)
        pytest.skip(reason)


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess[str]:
    _say("$ " + " ".join(cmd))
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    _say(f"  rc={r.returncode} in {time.monotonic() - t0:.0f} s")
    assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
    return r


def _trust_host_cas(rootfs: Path) -> None:
    """The build reaches PyPI and Debian's mirror from inside the chroot: where this host trusts
    extra CAs (a TLS-inspecting egress proxy), the test base trusts them too. Users' bases need
    nothing of this."""
    extra = Path("/usr/local/share/ca-certificates")
    if extra.is_dir() and any(extra.iterdir()):
        dest = rootfs / "usr/local/share/ca-certificates"
        dest.mkdir(parents=True, exist_ok=True)
        for crt in extra.iterdir():
            shutil.copy(crt, dest / crt.name)
        bundle = Path("/etc/ssl/certs/ca-certificates.crt")
        if bundle.is_file():  # until the image's apt installs ca-certificates and rebuilds it with those
            (rootfs / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
            shutil.copy(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
        # pip vendors its own CA list: point it at the system bundle
        (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")


def _have_image(name: str) -> bool:
    return subprocess.run(["buildah", *STORAGE, "inspect", "--type", "image", name],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    _tools()
    if not _have_image(BASE_IMAGE):
        rootfs = tmp_path_factory.mktemp("rootfs")
        _run(["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"], 900)
        _trust_host_cas(rootfs)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        _run(["podman", *STORAGE, "import", "-", BASE_IMAGE], 600, stdin=tar.stdout)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    if not _have_image(IMAGE):
        t0 = time.monotonic()
        _run(["buildah", *STORAGE, "bud", "--layers", "--isolation", "chroot", "--format", "docker",
              "--build-arg", f"BASE={BASE_IMAGE}", "-f", "deploy/Dockerfile", "-t", IMAGE, "."], 7200, cwd=ROOT)
        _say(f"image built in {time.monotonic() - t0:.0f} s")
    yield IMAGE
    if not os.environ.get("LOCALLLM_CONTAINER_KEEP"):
        subprocess.run(["buildah", *STORAGE, "rmi", IMAGE], capture_output=True)


@pytest.fixture()
def container(image: str):
    name = _run(["buildah", *STORAGE, "from", image], 600).stdout.strip().splitlines()[-1]
    yield name
    subprocess.run(["buildah", *STORAGE, "rm", name], capture_output=True)


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for k in kids.get(todo.pop(), []):
            out.append(k)
            todo.append(k)
    return out


def test_image_config_keeps_healthcheck_user_and_entrypoint(image: str) -> None:
    import json

    cfg = json.loads(_run(["buildah", *STORAGE, "inspect", "--type", "image", image], 120).stdout)
    docker = cfg.get("Docker", {}).get("config", {})
    assert "/health" in " ".join(docker["Healthcheck"]["Test"])
    assert docker["User"].startswith("10001")
    assert docker["Entrypoint"][:2] == ["localllm", "serve"]


def test_doctor_names_the_cpu_variant(container: str) -> None:
    out = _run(["buildah", *STORAGE, "run", "--isolation", "chroot", "--user", "10001:10001", container,
                "--", "localllm", "doctor"], 300).stdout
    _say(out)
    assert "CPU variant" in out and "libggml-cpu-" in out


def test_serves_a_chat_completion_and_drains_on_sigterm(container: str, tmp_path: Path) -> None:
    openai = pytest.importorskip("openai")
    models = tmp_path / "models"  # an empty volume: the baked default model is materialised into it
    models.mkdir()
    os.chown(models, 10001, 10001)
    port = free_port()
    cmd = ["buildah", *STORAGE, "run", "--isolation", "chroot", "--user", "10001:10001",
           "-v", f"{models}:/home/localllm/data/models", "-e", "LOCALLLM_API_KEY=test-key", container, "--",
           # the image's entrypoint, on a free port of the shared network
           "localllm", "serve", "--host", "0.0.0.0", "--port", str(port), "--server", "waitress",
           "--parallel", "2", "--ctx", "1024"]
    _say("$ " + " ".join(cmd))
    log = tmp_path / "server.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 600:
            assert proc.poll() is None, log.read_text()[-4000:]
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status
                break
            except urllib.error.HTTPError as e:
                status = e.code  # 503 while loading
            except OSError:
                pass
            time.sleep(1)
        assert status == 200, log.read_text()[-4000:]
        _say(f"/health 200 after {time.monotonic() - t0:.0f} s")
        assert any(models.rglob("*.gguf")), "the default model was not materialised into the volume"

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="test-key", max_retries=0)
        r = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": "Say hello."}])
        assert r.choices[0].message.content and r.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()

        # SIGTERM to the server itself (what the kubelet sends to the container's process)
        servers = [p for p in _children(proc.pid)
                   if b"serve" in Path(f"/proc/{p}/cmdline").read_bytes() and
                   b"buildah" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert servers, "no server process under buildah run"
        os.kill(servers[0], signal.SIGTERM)
        rc = proc.wait(timeout=60)
        text = log.read_text()
        assert rc == 0, text[-4000:]
    finally:
        if proc.poll() is None:
            for p in reversed(_children(proc.pid)):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait()
