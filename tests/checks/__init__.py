"""Checks below the core: the GGUF header check, the memory planner, the layers of the package, the docstrings' examples."""
