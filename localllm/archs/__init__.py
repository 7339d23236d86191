"""Per-architecture conversion rules, shipped as ``localllm.archs``."""
