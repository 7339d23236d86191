"""Measuring: bench against llama.cpp, eval (perplexity, KL), --quant auto, the default model's choice for this CPU."""
