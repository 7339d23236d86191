"""``localllm models ...``: list, show, verify, rm, import, pull and set the default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from localllm.cli.options import human_bytes, models_dir_option

_models_dir = models_dir_option
_json = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def _root(models_dir: str | None) -> Path:
    from localllm import settings

    return settings.models_dir(models_dir)


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def _describe(e: dict[str, Any]) -> str:
    src = e.get("source") or {}
    origin = (f"hub {src['hub']} ({src.get('file')}, revision {str(src.get('revision'))[:12]})" if "hub" in src
              else f"built-in ({src.get('package')})" if "builtin" in src
              else f"converted from {src['converted_from']}" if "converted_from" in src
              else f"imported from {src.get('path')}")
    params = e.get("parameters") or 0
    return "\n".join([
        f"{e['ref']}{'  (default)' if e.get('default') else ''}",
        f"  path        {e['path']}",
        f"  arch        {e.get('arch')}, {params / 1e6:.1f}M parameters, {e.get('quant')}",
        f"  size        {human_bytes(e.get('size') or 0)} ({e.get('size')} bytes)",
        f"  sha256      {e.get('sha256')}",
        f"  context     {e.get('context_length')} tokens trained, {e.get('block_count')} layers",
        f"  source      {origin}",
        f"  created     {e.get('created')} by localllm {e.get('localllm_version')}",
    ])


@click.group("models")
def group() -> None:
    """Manage the model store (see docs/store.md)."""


@group.command("list")
@_json
@_models_dir
def list_cmd(as_json: bool, models_dir: str | None) -> None:
    """List stored models (* marks the default)."""
    from localllm import store

    root = _root(models_dir)
    rows = store.list_models(root)
    if as_json:
        _emit({"root": str(root), "models": rows}, True, "")
        return
    if not rows:
        click.echo(f"no models in {root} (try `localllm models pull REPO` or `localllm run`)")
        return
    w = max(len(r["ref"]) for r in rows)
    click.echo(f"  {'MODEL':<{w}}  {'SIZE':>9}  {'QUANT':<8}  {'ARCH':<10}  CREATED")
    for r in rows:
        click.echo(f"{'*' if r['default'] else ' '} {r['ref']:<{w}}  {human_bytes(r['size'] or 0):>9}  "
                   f"{str(r['quant']):<8}  {str(r['arch']):<10}  {str(r['created'])[:19]}")
    click.echo(f"store: {root}")


@group.command("show")
@click.argument("ref")
@_json
@_models_dir
def show_cmd(ref: str, as_json: bool, models_dir: str | None) -> None:
    """Show a stored model's manifest: NAME or NAME:VERSION."""
    from localllm import store

    e = store.show(ref, _root(models_dir))
    _emit(e, as_json, _describe(e))


@group.command("verify")
@click.argument("ref", required=False)
@_json
@_models_dir
def verify_cmd(ref: str | None, as_json: bool, models_dir: str | None) -> int:
    """Check full sha256 of one model (or all) against the manifest. Exits 1 on a mismatch."""
    from tqdm import tqdm

    from localllm import store

    bars: list[Any] = []

    def progress(r: str, size: int, _: Any) -> Any:
        bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, desc=r, leave=False,
                   disable=None)  # disable=None: no bar when stderr is not a terminal
        bars.append(bar)
        return bar.update

    try:
        results = store.verify(ref, _root(models_dir), progress)
    finally:
        for b in bars:
            b.close()
    bad = [r for r in results if not r["ok"]]
    text = "\n".join(f"{'ok  ' if r['ok'] else 'FAIL'}  {r['ref']}" + (f": {r['problem']}" if r["problem"] else "")
                     for r in results) or "no models to verify"
    if bad and not as_json:
        text += f"\n{len(bad)} damaged: remove with `localllm models rm REF` and import or pull again"
    _emit({"results": results, "ok": not bad}, as_json, text)
    return 1 if bad else 0


@group.command("rm")
@click.argument("ref")
@_json
@_models_dir
def rm_cmd(ref: str, as_json: bool, models_dir: str | None) -> None:
    """Remove NAME:VERSION, or every version of NAME."""
    from localllm import store

    removed = store.remove(ref, _root(models_dir))
    _emit({"removed": removed}, as_json, "\n".join(f"removed {r}" for r in removed))


@group.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", required=True, help="Store name (lowercase letters, digits, . _ -).")
@click.option("--version", default=None, help="Version (default: the quant, e.g. q8_0).")
@_json
@_models_dir
def import_cmd(path: str, name: str, version: str | None, as_json: bool, models_dir: str | None) -> None:
    """Copy a .gguf file into the store (validated, hashed, atomic)."""
    from localllm import store

    e = store.import_file(path, name, version, root=_root(models_dir))
    _emit(e, as_json, f"imported {e['ref']}\n" + _describe(e))


@group.command("pull")
@click.argument("repo")
@click.option("--file", "file", default=None, help="File in the repository.")
@click.option("--quant", default=None, help="Pick the .gguf whose name has this quant (e.g. Q4_K_M).")
@click.option("--revision", default=None, help="Branch, tag or commit.")
@click.option("--name", default=None, help="Store name (default: from the repository name).")
@click.option("--version", default=None, help="Store version (default: the quant).")
@_json
@_models_dir
def pull_cmd(repo: str, file: str | None, quant: str | None, revision: str | None, name: str | None,
             version: str | None, as_json: bool, models_dir: str | None) -> None:
    """Download a GGUF from the Hugging Face Hub (honours HF_HUB_OFFLINE and the HF cache)."""
    from localllm import hub

    e = hub.pull(repo, file=file, quant=quant, revision=revision, name=name, version=version,
                 root=_root(models_dir))
    head = f"{e['ref']} is already in the store" if e["already_present"] else f"pulled {e['ref']}"
    _emit(e, as_json, head + "\n" + _describe(e))


@group.command("default")
@click.argument("ref")
@_json
@_models_dir
def default_cmd(ref: str, as_json: bool, models_dir: str | None) -> None:
    """Make NAME[:VERSION] the model used when none is given."""
    from localllm import resolve

    d = resolve.set_default(ref, _root(models_dir))
    _emit(d, as_json, f"default model: {d['default']} ({d['path']})")


commands = [group]
command = group  # cli.register_commands evaluates `mod.command` even when `commands` exists
