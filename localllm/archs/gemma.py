"""Gemma, Gemma2 and Gemma3 (text): RMSNorm weights +1, tied embeddings,
no SentencePiece space prefix; Gemma2 softcapping; sliding windows."""

from typing import Any

from localllm.converter.checkpoint import rope_params
from localllm.converter.rules import ArchRule


def _gemma2(cfg: dict[str, Any]) -> dict[str, Any]:
    return {"attn_logit_softcapping": float(cfg.get("attn_logit_softcapping") or 0.0),
            "final_logit_softcapping": float(cfg.get("final_logit_softcapping") or 0.0),
            "attention.sliding_window": int(cfg.get("sliding_window") or 4096)}


def _gemma3(cfg: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.get("final_logit_softcapping"):
        out["final_logit_softcapping"] = float(cfg["final_logit_softcapping"])
    if cfg.get("sliding_window"):
        out["attention.sliding_window"] = int(cfg["sliding_window"])
        # write the real per-layer pattern (llama.cpp otherwise assumes 5 local : 1 global)
        types = cfg.get("layer_types")
        if types:
            out["attention.sliding_window_pattern"] = [t == "sliding_attention" for t in types]
        out["rope.freq_base_swa"] = rope_params(cfg, "sliding_attention").get("rope_theta", 10000.0)
    return out


_COMMON = dict(norm_plus_one=True, tied_default=True, add_space_prefix=False)
RULE_GEMMA = ArchRule(hf_architectures=("GemmaForCausalLM",), gguf_arch="gemma", **_COMMON)
RULE_GEMMA2 = ArchRule(hf_architectures=("Gemma2ForCausalLM",), gguf_arch="gemma2", extra_kv=_gemma2, **_COMMON)
RULE = ArchRule(hf_architectures=("Gemma3ForCausalLM",), gguf_arch="gemma3", extra_kv=_gemma3,
                trim_embeddings=True, **_COMMON)
RULES = (RULE_GEMMA, RULE_GEMMA2, RULE)
