"""One real ``localllm serve`` process for the client tests: the default model, an API key, two
slots, and Claude Code's background model names mapped onto it."""

from __future__ import annotations

import pytest

from tests.serverutil import serve_process

KEY = "sk-local-test"
CTX = 2048


@pytest.fixture(scope="session")
def served(default_model_path):
    with serve_process("smollm2-135m", "--parallel", "2", "--ctx", str(CTX), "--api-key", KEY,
                       "--alias", "claude-*haiku*=smollm2-135m", "--alias", "claude-sonnet-*=smollm2-135m") as live:
        yield live
