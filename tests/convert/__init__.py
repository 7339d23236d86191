"""Conversion: HF checkpoints to GGUF against transformers, its errors and outputs, the importance matrix, the tokenizer anchor."""
