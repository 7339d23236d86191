"""The Model API on real GGUFs: the default SmolLM2 model, Gemma-3, and tiny test files.
(Sampling, chat, the scheduler and the loader have their own files in tests/core/.)"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from localllm import Model
from localllm.errors import ContextOverflowError, InvalidArgumentError, LocalLLMError, ModelBusyError, ModelClosedError
from tests.helpers import default_quant


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
        ids = m.chat_tokens([{"role": "user", "content": "hi"}])
        assert ids[0] == m.info.bos_token and ids[1] != m.info.bos_token


def test_tiny_model_from_the_tests(tiny_gguf: Path) -> None:
    with Model(tiny_gguf, n_ctx=128) as m:
        assert m.info.arch == "llama" and m.info.quant == "F32" and not m.info.has_chat_template
        assert m.complete("the cat", max_tokens=4, temperature=0).completion_tokens <= 4


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

