"""The generation core: scheduler, sampling, beams, chat templates, loader, prompt and KV caches, tools, huge pages, GPU, AMX."""
