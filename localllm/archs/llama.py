"""Llama 2/3 (incl. llama3 rope scaling), TinyLlama, SmolLM, and Mistral (same graph)."""

from localllm.converter.rules import ArchRule

RULE = ArchRule(
    hf_architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    gguf_arch="llama",
    permute_qk=True,  # HF half-split RoPE → llama.cpp interleaved (NORM rope)
)
