"""Qwen2 and Qwen3: NEOX rope (no permutation); Qwen2 has Q/K/V biases, Qwen3
has per-head q_norm/k_norm (mapped by gguf's TensorNameMap)."""

from localllm.converter.rules import ArchRule

RULE_QWEN2 = ArchRule(hf_architectures=("Qwen2ForCausalLM",), gguf_arch="qwen2")
RULE = ArchRule(hf_architectures=("Qwen3ForCausalLM",), gguf_arch="qwen3")
RULES = (RULE_QWEN2, RULE)
