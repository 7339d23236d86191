"""Code completion (fill-in-the-middle): ``/infill`` (llama-server's shape), ``/v1/completions`` with
``suffix`` (OpenAI's, through the ``openai`` client) and ``Model.infill``, on the default model copied
with FIM token ids written into its GGUF. The reference prompt is re-derived here from llama-server's
``format_prompt_infill`` (tools/server/server-common.cpp) with the ids this file wrote, and read back
through a plain completion of those token ids."""

from __future__ import annotations

import json

import pytest

from localllm import Model
from localllm.errors import InvalidArgumentError
from tests.helpers import copy_gguf
from tests.serverutil import live_server, post, stream_lines

openai = pytest.importorskip("openai")

# SmolLM2's vocabulary has <reponame> (4, which llama.cpp takes as FIM_REP by its text) but no FIM
# prefix/suffix/middle; the copy names three of its special tokens so, and <file_sep> FIM_SEP
FIM = {"pre": 11, "suf": 12, "mid": 13, "sep": 5, "rep": 4}
CTX = 1024
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"
EXTRA = [{"filename": "util/math.py", "text": "def sub(a, b):\n    return a - b\n"}]


@pytest.fixture(scope="module")
def fim_path(default_model_path, tmp_path_factory):
    keys = {f"tokenizer.ggml.fim_{k}_token_id": v for k, v in FIM.items() if k != "rep"}
    return copy_gguf(default_model_path, tmp_path_factory.mktemp("fim") / "smollm2-fim.gguf", keys)


@pytest.fixture(scope="module")
def server(fim_path):
    with live_server(model=str(fim_path), parallel=2, ctx=CTX, prompt_cache=False) as live:
        yield live


def tok(server, text: str, special: bool = False) -> list[int]:
    r = post(server.url + "/tokenize", json={"content": text, "add_special": False, "parse_special": special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def reference(server, prefix: str, suffix: str, extra=(), prompt: str = "") -> list[int]:
    """llama-server's prompt for these inputs (no BOS: SmolLM2's GGUF adds none)."""
    ids = [FIM["rep"], *tok(server, "myproject\n")]
    for f in extra:
        ids += [FIM["sep"], *tok(server, f["filename"] + "\n"), *tok(server, f["text"])]
    ids += [FIM["sep"], *tok(server, "filename\n")]
    return [*ids, FIM["pre"], *tok(server, prefix), *tok(server, prompt, True), FIM["suf"], *tok(server, suffix),
            FIM["mid"]]


def greedy(server, ids: list[int], n: int) -> str:
    r = post(server.api + "/completions", json={"prompt": ids, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def detok(server, ids: list[int]) -> str:
    return post(server.url + "/detokenize", json={"tokens": ids}).json()["content"]


def infill(server, **body):
    r = post(server.url + "/infill", json={"temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_infill_reads_llama_servers_prompt(server):
    body = dict(input_prefix=PREFIX, input_suffix=SUFFIX, input_extra=EXTRA, prompt="return", n_predict=12)
    got = infill(server, **body)
    ref = reference(server, PREFIX, SUFFIX, EXTRA, "return")
    assert got["prompt"] == detok(server, ref)
    assert got["tokens_evaluated"] == len(ref)
    assert got["content"] == greedy(server, ref, 12)
    assert got["tokens_predicted"] == len(got["tokens"]) <= 12
    assert got["stop"] is True and got["stop_type"] == ("limit" if got["tokens_predicted"] == 12 else "eos")


def test_infill_stream_is_the_whole_answer(server):
    body = dict(input_prefix=PREFIX, input_suffix=SUFFIX, n_predict=10)
    whole = infill(server, **body)
    with stream_lines(server.url + "/infill", {**body, "temperature": 0, "stream": True}) as lines:
        chunks = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
    assert [c["stop"] for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c["content"] for c in chunks) == whole["content"] and chunks[-1]["content"] == ""
    assert chunks[-1]["tokens_predicted"] == whole["tokens_predicted"]


def test_openai_suffix_is_the_same_prompt(server):
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="smollm2-fim", prompt=PREFIX, suffix=SUFFIX, max_tokens=12, temperature=0)
    ref = reference(server, PREFIX, SUFFIX)
    assert r.usage.prompt_tokens == len(ref)
    assert r.choices[0].text == greedy(server, ref, 12)


def test_mistral_fim_endpoint_as_continue_reads_it(server):
    """Continue's "mistral" provider: POST {apiBase}fim/completions, every chunk's choices[0].delta.content
    appended (a chunk without one would add "undefined")."""
    body = {"model": "smollm2-fim", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": 12, "temperature": 0}
    want = greedy(server, reference(server, PREFIX, SUFFIX), 12)
    r = post(server.api + "/fim/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want, r.text
    with stream_lines(server.api + "/fim/completions", {**body, "stream": True}) as lines:
        data = [x[6:] for x in lines if x.startswith("data: ")]
    assert data[-1] == "[DONE]"
    deltas = [json.loads(x)["choices"][0]["delta"]["content"] for x in data[:-1]]
    assert all(isinstance(d, str) for d in deltas) and "".join(deltas) == want


def test_prefix_and_suffix_are_cut_as_llama_server_cuts_them(server):
    prefix = "".join(f"x{i} = {i}\n" for i in range(300))
    suffix = "".join(f"y{i} = {i}\n" for i in range(300))
    got = infill(server, input_prefix=prefix, input_suffix=suffix, n_predict=1)
    window = CTX // 2  # min(2048, n_ctx // 2): prefix 3/4 of it from its end, suffix 1/4 - 2 from its start
    pre, suf = tok(server, prefix), tok(server, suffix)
    assert len(pre) > 3 * window // 4 and len(suf) > window // 4
    head = [FIM["rep"], *tok(server, "myproject\n"), FIM["sep"], *tok(server, "filename\n")]
    ref = [*head, FIM["pre"], *pre[-(3 * window // 4):], FIM["suf"], *suf[:window // 4 - 2], FIM["mid"]]
    assert got["tokens_evaluated"] == len(ref)
    assert got["prompt"] == detok(server, ref)


def test_bad_requests_are_400(server):
    for body, param in (({"input_suffix": ""}, "input_prefix"), ({"input_prefix": "", "input_suffix": 3}, "input_suffix"),
                        ({"input_prefix": "", "input_suffix": "", "input_extra": [{"filename": "a"}]}, "input_extra"),
                        ({"input_prefix": "", "input_suffix": "", "n_predict": -2}, "n_predict")):
        r = post(server.url + "/infill", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)


def test_model_infill_is_the_servers(server, fim_path):
    got = infill(server, input_prefix=PREFIX, input_suffix=SUFFIX, input_extra=EXTRA, n_predict=12)
    with Model(fim_path, n_ctx=CTX, prompt_cache=False) as m:
        ids = m.infill_tokens(PREFIX, SUFFIX, extra=EXTRA, max_tokens=12)
        assert ids == reference(server, PREFIX, SUFFIX, EXTRA)
        assert m.infill(PREFIX, SUFFIX, extra=EXTRA, max_tokens=12, temperature=0) == got["content"]
        spm = m.infill_tokens(PREFIX, SUFFIX, spm=True, max_tokens=12)  # suffix first, then prefix
        head = [FIM["rep"], *tok(server, "myproject\n"), FIM["sep"], *tok(server, "filename\n")]
        assert spm == [*head, FIM["suf"], *tok(server, SUFFIX), FIM["pre"], *tok(server, PREFIX), FIM["mid"]]


@pytest.fixture(scope="module")
def plain_server(default_model_path):
    with live_server(model=str(default_model_path), parallel=1, ctx=512, prompt_cache=False) as live:
        yield live


def test_a_model_without_fim_tokens_is_400(plain_server):
    r = post(plain_server.url + "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX})
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "prefix, suffix, middle missing" in msg and "coder model" in msg
    client = openai.OpenAI(base_url=plain_server.api, api_key="unused", max_retries=0, timeout=120)
    name = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle"):
        client.completions.create(model=name, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
    # an empty suffix (the cursor at the end of the file) is a plain completion there
    plain = client.completions.create(model=name, prompt=PREFIX, max_tokens=6, temperature=0)
    empty = client.completions.create(model=name, prompt=PREFIX, suffix="", max_tokens=6, temperature=0)
    assert empty.choices[0].text == plain.choices[0].text and empty.usage.prompt_tokens == plain.usage.prompt_tokens


def test_model_refuses_infill_without_fim_tokens(default_model_path):
    with Model(default_model_path, n_ctx=512, prompt_cache=False) as m:
        with pytest.raises(InvalidArgumentError, match="no fill-in-the-middle tokens"):
            m.infill(PREFIX, SUFFIX)


def test_models_list_fill_in_the_middle_where_the_vocabulary_has_it(server, default_model_path):
    """Editors choose a model for completion by its capabilities: "insert" (Ollama's word) comes from
    the FIM tokens this test wrote into the GGUF, and is absent from the same model without them."""
    from tests.serverutil import get, live_server

    assert "insert" in get(server.api + "/models").json()["data"][0]["capabilities"]
    with live_server(model=str(default_model_path), parallel=1, ctx=256, prompt_cache=False) as plain:
        assert "insert" not in get(plain.api + "/models").json()["data"][0]["capabilities"]
