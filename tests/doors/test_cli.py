"""The `localllm` command, run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, cli


def test_version_and_help() -> None:
    from localllm import __version__

    r = cli("--version")
    assert r.returncode == 0 and __version__ in r.stdout
    r = cli("--help")
    assert r.returncode == 0 and "run" in r.stdout and "doctor" in r.stdout


def test_run_streams_the_same_text_as_the_library(model, default_model_path: Path) -> None:
    expected = model.generate("The capital of France is", max_tokens=8, temperature=0)
    r = cli("run", str(default_model_path), "The capital of France is", "--raw", "--temp", "0", "-n", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert r.stderr == ""  # llama.cpp's log stays quiet


def test_run_default_model_and_prompt_only() -> None:
    # one positional that is not a model is the prompt, with the default model
    r = cli("run", "What is 2+2? Answer with a number.", "--temp", "0", "-n", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "4" in r.stdout


def test_run_json_has_text_and_timings() -> None:
    r = cli("run", "smollm2-135m", "Say hi", "--json", "--temp", "0", "-n", "5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    for key in ("text", "finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token_ms",
                "prompt_tokens_per_s", "generation_tokens_per_s"):
        assert key in d
    assert d["completion_tokens"] <= 5 and d["generation_tokens_per_s"] > 0


def test_run_reads_stdin() -> None:
    a = cli("run", "smollm2-135m", "-", "--raw", "--temp", "0", "-n", "6", input="Once upon a time")
    b = cli("run", "smollm2-135m", "Once upon a time", "--raw", "--temp", "0", "-n", "6")
    assert a.returncode == 0 and a.stdout == b.stdout


def _one_error_line(r: subprocess.CompletedProcess, code: int = 1) -> str:
    assert r.returncode == code, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_errors_are_one_line_with_a_next_step(tmp_path: Path) -> None:
    line = _one_error_line(cli("run", "/nope/model.gguf", "hi"))
    assert "does not exist" in line and "next:" in line
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF" * 100)
    assert "GGUF" in _one_error_line(cli("run", str(bad), "hi"))
    assert "prompt is" in _one_error_line(cli("run", "smollm2-135m", "word " * 300, "--ctx", "256"))
    assert "no model" in _one_error_line(cli("run", "nosuchmodel:v1", "hi"))


def test_bad_flags_are_usage_errors() -> None:
    for args in (["run", "--temp", "-1", "x"], ["run", "-n", "0", "x"], ["run", "--gpu-layers", "many", "x"],
                 ["run", "--ctx", "abc", "x"], ["nosuchcommand"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_debug_shows_the_traceback() -> None:
    r = cli("run", "/nope/model.gguf", "hi", env={"LOCALLLM_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "ModelNotFoundError" in r.stderr


def test_doctor_json(tmp_path: Path) -> None:
    r = cli("doctor", "--json", "--model", "smollm2-135m")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) >= {"cpu", "build", "gpu", "memory", "disk", "model", "problems", "ok"}
    assert d["ok"] is True
    flags = d["cpu"]["flags"]
    assert isinstance(flags, dict) and ("avx2" in flags or "neon" in flags)
    assert "AVX2" in d["build"]["features"] or "NEON" in d["build"]["features"]
    assert d["build"]["gpu_offload"] in (True, False)
    if not d["gpu"]["compiled"]:  # a CPU-only build: how to rebuild with each backend
        assert "GGML_CUDA" in d["gpu"]["gpu_rebuild"]["cuda"] and "GGML_VULKAN" in d["gpu"]["gpu_rebuild"]["vulkan"]
    else:
        assert d["gpu"]["gpu_rebuild"] is None
    assert d["model"]["fits"]
    # auto: 0 layers without offload or without a GPU device; on a GPU build with a device the plan places some
    if not d["build"]["gpu_offload"] or not d["gpu"]["devices"]:
        assert d["model"]["gpu_layers"] == 0
    else:
        assert 0 < d["model"]["gpu_layers"] <= d["model"]["n_layer"] + 1
    r = cli("doctor")
    assert r.returncode == 0 and "OK" in r.stdout


def test_doctor_flags_a_build_the_cpu_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import doctor, hardware

    real = hardware.cpu()
    fake = {**real, "flags": {k: False for k in real["flags"]}}
    monkeypatch.setattr(hardware, "cpu", lambda: fake)
    r = doctor.report()
    assert r["ok"] is False
    err = [p for p in r["problems"] if p["severity"] == "error"][0]
    assert "illegal instruction" in err["message"] and "GGML_NATIVE" in err["fix"]


def test_interactive_chat_reset_stop_and_exit() -> None:
    """The REPL on a pseudo-terminal: answer, Ctrl-C stops an answer (not the program), /reset, /exit."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "localllm", "run", "smollm2-135m", "--temp", "0", "-n", "400"],
                            stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    buf = b""

    def read_until(marker: bytes, timeout: float = 60) -> bytes:
        nonlocal buf
        end = time.time() + timeout
        while marker not in buf:
            if time.time() > end:
                raise AssertionError(f"timed out waiting for {marker!r}; got {buf[-500:]!r}")
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    buf += os.read(master, 4096)
                except OSError:
                    break
        out, buf = buf[:buf.index(marker) + len(marker)], buf[buf.index(marker) + len(marker):]
        return out

    try:
        read_until(b">>> ")
        os.write(master, b"What is 2+2?\n")
        assert b"4" in read_until(b">>> ")
        os.write(master, b"Write a very long story about a dragon.\n")
        read_until(b"dragon.")  # the terminal's echo of the line
        # Ctrl-C once the answer is streaming (a fixed sleep races a busy machine)
        end = time.time() + 60
        while len(buf) < 40 and time.time() < end:
            if select.select([master], [], [], 0.2)[0]:
                buf += os.read(master, 4096)
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does
        assert b"[stopped]" in read_until(b">>> ")
        assert proc.poll() is None  # still running
        os.write(master, b"/reset\n")
        assert b"cleared" in read_until(b">>> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_ctrl_c_at_any_moment_stops_the_answer_not_the_program() -> None:
    """Ctrl-C while a long prompt is read, right after the first token, and deep into an
    answer: each stops that answer and the REPL goes on; all with the other core busy."""
    import pty
    import select

    burner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # a loaded machine
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "localllm", "run", "smollm2-135m", "--temp", "0", "-n", "300",
                             "--ctx", "4096"], stdin=slave, stdout=slave, stderr=slave, cwd=ROOT, close_fds=True)
    os.close(slave)
    buf = bytearray()

    def read_until(pred, timeout: float = 120) -> None:
        end = time.time() + timeout
        while not pred():
            if time.time() > end:
                raise AssertionError(f"timed out; got {bytes(buf[-500:])!r}")
            if select.select([master], [], [], 0.1)[0]:
                try:
                    buf.extend(os.read(master, 4096))
                except OSError:
                    raise AssertionError(f"the program ended; got {bytes(buf[-500:])!r}") from None

    def prompts() -> int:
        return buf.count(b">>> ")

    def cpu_seconds() -> float:
        """The REPL's CPU time: it rises once it has read a line and works on it."""
        fields = open(f"/proc/{proc.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def working(since: float):
        return lambda: cpu_seconds() - since >= 0.05

    try:
        read_until(lambda: prompts() == 1)
        long_text = "Summarise this: " + " ".join(f"item{i} is blue;" for i in range(900)) + "\n"
        moments = [(long_text, "cpu"),                                 # while the prompt is read
                   ("Tell me a story.\n", None),                        # at the first piece of the answer
                   ("Write a very long story about a dragon.\n", 200)]  # deep into the answer
        for n, (line, when) in enumerate(moments, start=1):
            mark = len(buf)
            before = cpu_seconds()
            os.write(master, line.encode())
            if when == "cpu":  # the line was read and is being worked on (not still waiting at the prompt)
                read_until(working(before))
            elif isinstance(when, int):
                read_until(lambda: len(buf) - mark > len(line) + when)
            elif when is None:
                read_until(lambda: len(buf) - mark > len(line) + 2)
            proc.send_signal(signal.SIGINT)  # what Ctrl-C does
            read_until(lambda: prompts() == n + 1)
            assert proc.poll() is None, bytes(buf[-300:])
            assert b"[stopped]" in buf[mark:] or b"interrupted" not in buf[mark:]
        mark = len(buf)
        os.write(master, b"/reset\n")
        read_until(lambda: prompts() == len(moments) + 2)
        os.write(master, b"What is 2+2?\n")
        read_until(lambda: prompts() == len(moments) + 3)
        assert b"4" in buf[mark:]
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=30) == 0
        assert buf.count(b"[stopped]") >= 2  # the answers that had begun say so
    finally:
        burner.kill()
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_serve_refuses_a_bad_model_at_once(tmp_path: Path) -> None:
    # not a server that starts and then answers 503 forever
    assert "does not exist" in _one_error_line(cli("serve", "--model-path", "/nope/model.gguf", "--port", "0",
                                                   timeout=30))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 40)
    assert "GGUF" in _one_error_line(cli("serve", "--model-path", str(bad), "--port", "0", timeout=30))
