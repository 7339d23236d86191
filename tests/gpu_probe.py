"""Run in a subprocess by tests/core/test_gpu.py, with ``GGML_VK_VISIBLE_DEVICES`` set, so that a CPU
Vulkan device (Mesa's lavapipe) is used only by the GPU tests and never by the rest of the suite.

    python tests/gpu_probe.py greedy MODEL GPU_LAYERS N_TOKENS LOGITS.npy   # greedy tokens (+ logits)
    python tests/gpu_probe.py auto MODEL GPU_MEMORY                         # Model(gpu_memory=...) placed

Each prints one JSON object on stdout."""

from __future__ import annotations

import json
import re
import sys

import numpy as np

PROMPT = "The capital of France is"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith("VmRSS:")).split()[1]) * 1024


def _device_buffers(lines: list[str]) -> dict[str, float]:
    """llama.cpp's own "<device> <kind> buffer size = X MiB" lines for non-CPU devices, in bytes. A device's
    ``_Host`` buffer (pinned RAM: where llama.cpp reads the CPU layers' weights when the file is not mapped)
    is RAM, not device memory."""
    out: dict[str, float] = {}
    for ln in lines:
        m = re.search(r"\b(\S+) (model|KV|compute) buffer size =\s*([0-9.]+) MiB", ln)
        if m and not m.group(1).upper().startswith("CPU") and not m.group(1).endswith("_Host"):
            out[m.group(2)] = out.get(m.group(2), 0.0) + float(m.group(3)) * 2**20
    return out


def greedy(path: str, gpu_layers: int, n_tokens: int, logits_out: str) -> dict:
    from localllm import runtime

    m = runtime.LlamaModel(path, n_gpu_layers=gpu_layers)
    ctx = runtime.Context(m, n_ctx=256, n_threads=2)
    batch = runtime.Batch(256)
    toks = m.tokenize(PROMPT, add_special=True, parse_special=False)
    for i, t in enumerate(toks):
        batch.add(t, i, 0, i == len(toks) - 1)
    rows, out, pos = [], [], len(toks)
    for _ in range(n_tokens):
        ctx.decode(batch)
        row = ctx.logits(batch.n - 1).copy()
        rows.append(row)
        out.append(int(row.argmax()))
        batch.clear()
        batch.add(out[-1], pos, 0, True)
        pos += 1
    np.save(logits_out, np.stack(rows))
    log = runtime.log_tail(400)
    offloaded = [ln for ln in log if "offloaded" in ln and "layers to GPU" in ln]
    ctx.close()
    m.close()
    return {"tokens": out, "log_offloaded": offloaded[-1].strip() if offloaded else None}


def auto(path: str, gpu_memory: int) -> dict:
    from localllm import Model, runtime

    before = _rss()
    with Model(path, n_ctx=512, gpu_memory=gpu_memory, prompt_cache=False) as mdl:
        mdl.generate(PROMPT, max_tokens=2, temperature=0)
        info = mdl.info.to_dict()
        rss = _rss()
    lines = runtime.log_tail(400)
    return {"info": info, "rss_before": before, "rss": rss, "device_buffers": _device_buffers(lines),
            "log_offloaded": next((ln.strip() for ln in reversed(lines) if "layers to GPU" in ln), None)}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "greedy":
        res = greedy(args[0], int(args[1]), int(args[2]), args[3])
    else:
        res = auto(args[0], int(args[1]))
    print(json.dumps(res))
