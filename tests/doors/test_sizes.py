"""One size parser at every door: ``512MB`` is 512·10⁶ bytes and ``512MiB`` (or ``512M``) 512·2²⁰, whether it
is ``--gpu-memory`` of run/serve/plan, ``--max-memory`` of serve, ``Model(gpu_memory=...)`` or the server's
settings. Before, placement read "MB" as 10⁶ and the CLI's ByteSize as 2²⁰."""

from __future__ import annotations

import click
import pytest

SIZES = {"512MB": 512 * 10**6, "512MiB": 512 * 2**20, "512M": 512 * 2**20, "2GB": 2 * 10**9, "2GiB": 2 * 2**30,
         "1.5g": int(1.5 * 2**30), "3000000": 3_000_000}


def _size_options() -> list[tuple[str, click.Parameter]]:
    """Every option of every command that takes a size (the CLI's doors)."""
    from localllm import cli
    from localllm.cli.options import ByteSize, GpuMemory

    cli.register_commands()
    out = []

    def walk(cmd: click.Command, path: str) -> None:
        for p in cmd.params:
            if isinstance(p.type, (GpuMemory, ByteSize)):
                out.append((f"{path} {p.opts[0]}", p))
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(cli.cli, "")
    return out


def test_every_size_option_is_found() -> None:
    names = {n for n, _ in _size_options()}
    assert {"run --gpu-memory", "serve --gpu-memory", "plan --gpu-memory", "serve --max-memory"} <= names, names


@pytest.mark.parametrize("text", sorted(SIZES))
def test_a_size_means_the_same_bytes_at_every_door(text: str) -> None:
    from localllm.formats import parse_size
    from localllm.loader import ModelSettings
    from localllm.placement import parse_gpu_memory
    from localllm.server import ServerSettings

    want = SIZES[text]
    assert parse_size(text) == want
    for name, p in _size_options():
        assert p.type.convert(text, p, None) == want, name
    assert ModelSettings(gpu_memory=text).gpu_memory == want               # Model(gpu_memory=...) and the core
    assert ServerSettings.create(gpu_memory=text).model.gpu_memory == want  # the server's settings
    assert parse_gpu_memory(text) == want


@pytest.mark.parametrize("bad", ["", "MB", "12 parsecs", "-1", "1e3x", "0x10"])
def test_a_bad_size_is_refused_with_one_line(bad: str) -> None:
    from localllm.errors import InvalidArgumentError
    from localllm.formats import parse_size

    with pytest.raises(InvalidArgumentError, match="must be a size like 2GiB"):
        parse_size(bad, "gpu_memory")
    for name, p in _size_options():
        with pytest.raises(click.BadParameter):
            p.type.convert(bad, p, None)
