"""``localllm doctor``: check the machine, the llama.cpp build and (optionally) a model."""

from __future__ import annotations

import json

import click

from localllm.cli.options import human_bytes, models_dir_option


def _huge_pages_line(hp: dict) -> str:
    mode = hp["thp_mode"]
    if mode is None:
        return "no transparent huge pages on this system"
    if hp["asked"]:
        return f"{mode}: weights read into huge pages (--mmap or LOCALLLM_HUGEPAGES=0 maps them from the file)"
    if mode == "madvise":
        return "madvise: huge pages not asked, weights mapped from the file (LOCALLLM_HUGEPAGES=0)"
    if mode == "always":
        return "always: weights read into memory, which the kernel backs with huge pages"
    return f"{mode}: off, weights mapped from the file"


def _offload_line(gpu: dict) -> str:
    compiled = ", ".join(gpu["compiled"])
    if gpu["offload"]:
        return f"yes: {compiled} compiled in, {len(gpu['devices'])} GPU device(s)"
    return f"no: {compiled} compiled in, but no GPU device seen" if compiled else "not compiled in (CPU only)"


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report (keys in docs/doctor.md).")
@click.option("--model", "-m", default=None, help="Also plan memory for this model (path or name).")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None, help="Context size for --model.")
@models_dir_option
def command(as_json: bool, model: str | None, n_ctx: int | None, models_dir: str | None) -> int:
    """Check CPU features, the llama.cpp build, GPU, memory and disk. Exits 1 if something blocks running."""
    from localllm import doctor, resolve

    path = resolve.resolve(model, models_dir=models_dir) if model is not None or models_dir is not None else None
    r = doctor.report(path, n_ctx=n_ctx, models_dir=models_dir)
    if as_json:
        click.echo(json.dumps(r, indent=2))
        return 0 if r["ok"] else 1
    cpu, b = r["cpu"], r["build"]
    have = " ".join(f for f, on in cpu["flags"].items() if on) or "none"
    lack = " ".join(f for f, on in cpu["flags"].items() if not on) or "none"
    rows = [
        ("CPU", f"{cpu['model']} ({cpu['arch']}), {cpu['usable_cores']} usable of {cpu['logical_cores']} cores"),
        ("  flags", have),
        ("  lacks", lack),
        ("llama.cpp", f"llama-cpp-python {b['llama_cpp_python']}, built for: "
                      + " ".join(k for k, on in b["features"].items() if on)),
        ("GPU offload", _offload_line(r["gpu"])),
    ]
    if b.get("cpu_variant"):  # a GGML_CPU_ALL_VARIANTS build (the container image): the kernels ggml chose
        rows.insert(4, ("  CPU variant", f"libggml-cpu-{b['cpu_variant']} (the best of the image's variants here)"))
    for d in r["gpu"]["backends"]:  # every device llama.cpp sees, the CPU included
        rows.append(("  device", f"{d['name']} ({d['type']}) {d['description']}: {human_bytes(d['memory_free'])} "
                                 f"free of {human_bytes(d['memory_total'])}"))
    for kind, cmd in (r["gpu"]["gpu_rebuild"] or {}).items():
        rows.append((f"  for {kind.capitalize() if kind != 'cuda' else 'CUDA'}", cmd))
    rows.append(("RAM", f"{human_bytes(r['memory']['available'])} available of {human_bytes(r['memory']['total'])}"))
    rows.append(("  THP", _huge_pages_line(r["huge_pages"])))  # a short label: the columns stay put
    rows.append(("Disk", f"{human_bytes(r['disk']['free'])} free at {r['disk']['path']}"))
    if "model" in r:
        p = r["model"]
        rows.append(("Model", p["path"]))
        rows.append(("  needs", f"{human_bytes(p['total_bytes'])} at {p['n_ctx']} tokens: weights "
                                f"{human_bytes(p['weights_bytes'])}, KV cache {human_bytes(p['kv_bytes'])}, "
                                f"compute {human_bytes(p['compute_bytes'])}"))
        rows.append(("  fits", ("yes" if p["fits"] else "NO") + f", {p['gpu_layers']} layers on GPU"))
        for reason in p["reasons"]:
            rows.append(("", reason))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    for prob in r["problems"]:
        click.echo(f"{prob['severity'].upper()}: {prob['message']}" + (f"\n  fix: {prob['fix']}" if prob["fix"] else ""))
    click.echo("OK: ready to run models" if r["ok"] else "NOT OK: fix the errors above")
    return 0 if r["ok"] else 1
