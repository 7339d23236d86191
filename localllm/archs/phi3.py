"""Phi-3 / Phi-3.5 / Phi-4-mini: fused qkv_proj and gate_up_proj (kept fused;
llama.cpp splits them at run time), NEOX rope, optional longrope factors."""

from typing import Any

from localllm.converter.rules import ArchRule


def _phi3(cfg: dict[str, Any]) -> dict[str, Any]:
    # llama.cpp's phi3 graph reads the sliding window but runs without it; write it for completeness
    return {"attention.sliding_window": int(cfg.get("sliding_window") or 0)}


RULE = ArchRule(hf_architectures=("Phi3ForCausalLM",), gguf_arch="phi3", extra_kv=_phi3)
