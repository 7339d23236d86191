"""The scheduler (localllm/core/scheduler.py) as ``Model`` drives it: a chat's next turn reuses
its KV slot up to the last finished turn and answers as a fresh model does, and a request
interrupted while it starts gives its slot back."""

from __future__ import annotations

from pathlib import Path

import pytest

from localllm import Model
from tests.helpers import turn_end_cut


def test_kv_cache_prefix_is_reused_and_output_unchanged(model: Model, default_model_path: Path) -> None:
    history = [{"role": "user", "content": "Name a colour."}]
    first = model.chat_complete(history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And another?"}]
    second = model.chat_complete(history, max_tokens=8, temperature=0)
    # reused up to the end of the last finished turn at least MIN_CHUNK tokens long (here the system
    # prompt); the short question and the answer, generated one token at a time, are read again
    (im_end,) = model.engine.llama.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert second.cached_tokens == turn_end_cut(model.chat_tokens(history[:1]), im_end) > 0
    with Model(default_model_path, n_ctx=1024) as fresh:
        assert fresh.chat(history, max_tokens=8, temperature=0) == second.text


def test_an_interrupt_while_a_request_starts_frees_its_slot(default_model_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C can land while a request is being set up (its prompt restored from disk, say): its slot
    must not stay claimed, or every later request would wait for a slot forever."""
    from localllm.core.scheduler import Scheduler

    with Model(default_model_path, n_ctx=512, prompt_cache=False) as m:
        def interrupted(self, req, chosen):
            raise KeyboardInterrupt

        with monkeypatch.context() as mp:
            mp.setattr(Scheduler, "_start_unit", interrupted)
            with pytest.raises(KeyboardInterrupt):
                m.chat([{"role": "user", "content": "Hi"}], max_tokens=4)
        assert m.engine.status().busy_slots == 0
        assert m.complete("1, 2, 3,", max_tokens=4, temperature=0).text.startswith(" 4")

