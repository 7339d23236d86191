"""The server: OpenAI and Anthropic APIs through the official clients, the page in Chromium, faults, fuzzing, the pool."""
