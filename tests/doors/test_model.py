"""The Model API on real GGUFs: the default SmolLM2 model, Gemma-3, and tiny test files."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from localllm import Model
from localllm.errors import (ContextOverflowError, InvalidArgumentError, InvalidModelFileError, LocalLLMError,
                             ModelBusyError, ModelClosedError, ModelNotFoundError, TemplateError,
                             UnsupportedArchitectureError)
from conftest import default_quant, turn_end_cut
from ggufs import write_tiny_llama


def test_info_describes_the_default_model(model: Model) -> None:
    info = model.info
    assert info.arch == "llama"
    assert info.quant == default_quant()  # chosen for this CPU: requantized from the shipped Q4_1
    assert 130e6 < info.parameters < 140e6
    assert info.context_train == 8192 and info.context == 1024
    assert info.has_chat_template
    from localllm import placement, runtime

    if runtime.supports_gpu_offload():  # auto: what the one placement path chose (0 without a GPU device)
        assert info.gpu_layers == min(placement.choose_gpu_layers(info.path, "auto", info.context), info.n_layer + 1)
    else:
        assert info.gpu_layers == 0 and info.layer_split == f"CPU: all {info.n_layer} layers"


def test_greedy_generation_is_reproducible_and_sensible(model: Model) -> None:
    a = model.generate("The capital of France is", max_tokens=12, temperature=0)
    b = model.generate("The capital of France is", max_tokens=12, temperature=0)
    assert a == b
    assert "Paris" in a


def test_seeded_sampling_is_reproducible(model: Model) -> None:
    a = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    b = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=42)
    c = model.generate("Once upon a time", max_tokens=16, temperature=1.0, seed=43)
    assert a == b
    assert a != c


def test_stream_equals_generate(model: Model) -> None:
    pieces = list(model.stream("One, two, three,", max_tokens=10, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == model.generate("One, two, three,", max_tokens=10, temperature=0)
    assert model.last.completion_tokens == 10 and model.last.finish_reason == "length"


def test_max_tokens_and_stop_strings(model: Model) -> None:
    r = model.complete("One, two, three,", max_tokens=5, temperature=0)
    assert r.completion_tokens == 5 and r.finish_reason == "length"
    r = model.complete("One, two, three,", max_tokens=20, temperature=0, stop=["six"])
    assert r.finish_reason == "stop"
    assert "six" not in r.text and "five" in r.text


def test_chat_uses_the_models_template(model: Model) -> None:
    text = model.render_chat([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    answer = model.chat([{"role": "user", "content": "What is 2+2?"}], max_tokens=30, temperature=0)
    assert "4" in answer
    r = model.chat_complete([{"role": "user", "content": "Say hello."}], max_tokens=200, temperature=0)
    assert r.finish_reason == "stop"  # stopped at <|im_end|>, not at the limit
    assert "<|im_end|>" not in r.text


def test_chat_stream_and_system_prompt(model: Model) -> None:
    msgs = [{"role": "user", "content": "What is your name?"}]
    streamed = "".join(model.chat_stream(msgs, max_tokens=20, temperature=0, system="You are Bob."))
    assert streamed == model.chat(msgs, max_tokens=20, temperature=0, system="You are Bob.")
    assert "You are Bob." in model.render_chat([{"role": "system", "content": "You are Bob."}, *msgs])


def test_kv_cache_prefix_is_reused_and_output_unchanged(model: Model, default_model_path: Path) -> None:
    history = [{"role": "user", "content": "Name a colour."}]
    first = model.chat_complete(history, max_tokens=8, temperature=0)
    history += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And another?"}]
    second = model.chat_complete(history, max_tokens=8, temperature=0)
    # reused up to the end of the last finished turn at least MIN_CHUNK tokens long (here the system
    # prompt); the short question and the answer, generated one token at a time, are read again
    (im_end,) = model._engine.llama.tokenize("<|im_end|>", add_special=False, parse_special=True)
    assert second.cached_tokens == turn_end_cut(model._chat_ids(history[:1]), im_end) > 0
    with Model(default_model_path, n_ctx=1024) as fresh:
        assert fresh.chat(history, max_tokens=8, temperature=0) == second.text


def test_context_overflow_is_an_error_not_a_truncation(default_model_path: Path) -> None:
    with Model(default_model_path, n_ctx=256) as m:
        with pytest.raises(ContextOverflowError) as e:
            m.generate("word " * 400, max_tokens=4)
        assert e.value.status == 400 and e.value.n_ctx == 256
        # generation that reaches the end of the context stops with "length"
        r = m.complete("word " * 200, max_tokens=None, temperature=0)
        assert r.finish_reason in ("length", "stop")
        assert r.prompt_tokens + r.completion_tokens <= 256


def test_tokenize_detokenize(model: Model) -> None:
    ids = model.tokenize("Hello world", add_bos=False)
    assert model.detokenize(ids) == "Hello world"
    # special=True parses special-token text into one token
    special = model.tokenize("<|im_end|>", add_bos=False, special=True)
    plain = model.tokenize("<|im_end|>", add_bos=False, special=False)
    assert len(special) == 1 and len(plain) > 1
    with pytest.raises(InvalidArgumentError):
        model.tokenize(b"bytes")  # type: ignore[arg-type]


def test_embeddings_are_normalised_and_meaningful(model: Model) -> None:
    import numpy as np

    a, b, c = (np.array(v) for v in model.embed(["I love cats", "I adore cats", "Quarterly tax filing deadline"]))
    assert a.shape == (576,)
    assert abs(np.linalg.norm(a) - 1) < 1e-4
    assert a @ b > a @ c


def test_a_model_is_not_shared_between_threads(model: Model) -> None:
    stream = model.stream("Count to ten:", max_tokens=50, temperature=0)
    next(stream)
    errors = []
    t = threading.Thread(target=lambda: errors.append(_catch(lambda: model.generate("x", max_tokens=2))))
    t.start()
    t.join()
    stream.close()
    assert isinstance(errors[0], ModelBusyError)
    model.generate("x", max_tokens=2)  # usable again once the stream is closed


def _catch(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return e
    return None


def test_bad_sampling_values(model: Model) -> None:
    for kw in ({"max_tokens": 0}, {"max_tokens": -1}, {"temperature": -1}, {"top_p": 0}, {"top_p": 1.5},
               {"min_p": 2}, {"top_k": -1}, {"repeat_penalty": 0}, {"stop": [1]}, {"temperature": float("nan")},
               {"seed": "x"}):
        with pytest.raises(InvalidArgumentError):
            model.generate("hi", **kw)
    model.generate("hi", max_tokens=1)  # the lock was released after each error


def test_closed_model(default_model_path: Path) -> None:
    m = Model(default_model_path, n_ctx=128)
    m.close()
    m.close()
    with pytest.raises(ModelClosedError):
        m.generate("hi")


def test_gemma3_runs(gemma_path: Path) -> None:
    with Model(gemma_path, n_ctx=512) as m:
        assert m.info.arch == "gemma3" and m.info.quant == "Q4_K_M"
        out = m.generate("The capital of France is", max_tokens=12, temperature=0)  # a base model
        assert "capital" in out and "France" in out
        # this GGUF has no template: the gemma one is chosen from its special tokens
        assert not m.info.has_chat_template and "gemma" in m.template_source
        text = m.render_chat([{"role": "user", "content": "hi"}])
        assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"
        # the template writes <bos> itself: it must not be doubled
        ids = m._chat_ids([{"role": "user", "content": "hi"}])
        assert ids[0] == m.info.bos_token and ids[1] != m.info.bos_token


def test_tiny_model_from_the_tests(tiny_gguf: Path) -> None:
    with Model(tiny_gguf, n_ctx=128) as m:
        assert m.info.arch == "llama" and m.info.quant == "F32" and not m.info.has_chat_template
        assert m.complete("the cat", max_tokens=4, temperature=0).completion_tokens <= 4


# ---------------------------------------------------------------- bad model files

def test_missing_path() -> None:
    with pytest.raises(ModelNotFoundError) as e:
        Model("/nonexistent/model.gguf")
    assert isinstance(e.value, FileNotFoundError) and e.value.hint


def test_unknown_model_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no model 'no-such-model'"):
        Model("no-such-model")


def test_not_a_gguf(tmp_path: Path) -> None:
    p = tmp_path / "notes.gguf"
    p.write_text("just some text, not a model " * 10)
    with pytest.raises(InvalidModelFileError, match="GGUF magic"):
        Model(p)


def test_truncated_gguf(tmp_path: Path, tiny_gguf: Path) -> None:
    data = tiny_gguf.read_bytes()
    for cut in (10, 200, len(data) // 2, len(data) - 7):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(InvalidModelFileError):
            Model(p)


def test_unknown_architecture(tmp_path: Path) -> None:
    p = write_tiny_llama(tmp_path / "alien.gguf", arch="alienformer")
    with pytest.raises(UnsupportedArchitectureError, match="alienformer"):
        Model(p)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError, match="directory"):
        Model(tmp_path)


def test_bad_constructor_values(tiny_gguf: Path) -> None:
    for kw in ({"n_ctx": 0}, {"n_ctx": 10**9}, {"n_threads": 0}, {"n_gpu_layers": "most"}, {"n_gpu_layers": -2}):
        with pytest.raises(InvalidArgumentError):
            Model(tiny_gguf, **kw)


def test_template_is_sandboxed(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    monkeypatch.setattr(model._engine.prompter, "template", evil)
    with pytest.raises(TemplateError):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=1)
    monkeypatch.setattr(model._engine.prompter, "template", "{{ raise_exception('no system role') }}")
    with pytest.raises(TemplateError, match="no system role"):
        model.chat([{"role": "user", "content": "hi"}], max_tokens=1)


def test_bad_messages(model: Model) -> None:
    for bad in ([], "hi", [{"role": "wizard", "content": "x"}], [{"role": "user", "content": 3}], [3]):
        with pytest.raises(InvalidArgumentError):
            model.chat(bad, max_tokens=1)  # type: ignore[arg-type]


def test_all_errors_share_the_base_class() -> None:
    import localllm.errors as E

    for name in dir(E):
        obj = getattr(E, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == E.__name__:
            assert issubclass(obj, LocalLLMError)
            assert isinstance(obj.status, int)


def test_an_unstarted_stream_does_not_keep_the_model_busy(model: Model) -> None:
    before = model.generate("hi", max_tokens=3, temperature=0)
    it = model.stream("hi", max_tokens=2)
    del it  # never iterated: without the release this raises ModelBusyError below
    assert model.generate("hi", max_tokens=3, temperature=0) == before
    it = model.chat_stream([{"role": "user", "content": "hi"}], max_tokens=2)
    it.close()
    assert model.generate("hi", max_tokens=3, temperature=0) == before


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
        assert not any(sl.busy for sl in m._engine.scheduler.slots)
        assert m.complete("1, 2, 3,", max_tokens=4, temperature=0).text.startswith(" 4")
