"""Every sampling option gives the same tokens through every door: ``Model``,
``localllm run --json`` (a subprocess) and the HTTP API (the official
``openai`` client), on the default model with fixed seeds.

Each row is written once, as ``SamplingParams`` keywords; the test turns it
into CLI flags and an HTTP body the way a user would."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.helpers import cli
from tests.serverutil import live_server

openai = pytest.importorskip("openai")
CTX = 1024
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}

# (prompt, SamplingParams keywords): one row per option, each with its own prompt
CASES: list[tuple[str, dict[str, Any]]] = [
    ("Once upon a time", dict(temperature=0.9, seed=3, max_tokens=12)),
    ("The weather today is", dict(temperature=1.0, top_p=0.5, seed=4, max_tokens=12)),
    ("My favourite food is", dict(temperature=1.0, top_k=3, seed=5, max_tokens=12)),
    ("In the morning I", dict(temperature=1.0, min_p=0.2, seed=6, max_tokens=12)),
    ("one two one two one two", dict(temperature=0, repeat_penalty=1.5, max_tokens=10)),
    ("red blue red blue red blue", dict(temperature=0, presence_penalty=1.5, max_tokens=10)),
    ("cat dog cat dog cat dog", dict(temperature=0, frequency_penalty=1.2, max_tokens=10)),
    ("A long story:", dict(temperature=1.0, seed=99, max_tokens=7)),
    ("Count: 1, 2, 3,", dict(temperature=0, stop=[" 6"], max_tokens=30)),
    ("Is water wet? Answer:", dict(temperature=0.7, seed=1, grammar='root ::= " yes" | " no"', max_tokens=8)),
    ("A person as JSON:", dict(temperature=0, json_schema=SCHEMA, max_tokens=48)),
    ("The sea is", dict(temperature=1.0, seed=8, n=3, max_tokens=8)),
    ("The sky is", dict(temperature=1.0, seed=9, n=2, best_of=3, max_tokens=8)),
    ("The capital of Italy is", dict(num_beams=3, max_tokens=8)),
    ("Python is a", dict(temperature=0, logprobs=True, top_logprobs=3, max_tokens=6)),
]


def cli_flags(kw: dict[str, Any]) -> list[str]:
    names = {"max_tokens": "-n", "temperature": "--temp", "top_p": "--top-p", "top_k": "--top-k",
             "min_p": "--min-p", "repeat_penalty": "--repeat-penalty", "presence_penalty": "--presence-penalty",
             "frequency_penalty": "--frequency-penalty", "seed": "--seed", "grammar": "--grammar",
             "n": "--choices", "best_of": "--best-of", "num_beams": "--num-beams"}
    out: list[str] = []
    for k, v in kw.items():
        if k == "stop":
            for s in v:
                out += ["--stop", s]
        elif k == "json_schema":
            out += ["--json-schema", json.dumps(v)]
        elif k == "logprobs":
            out += ["--logprobs", str(kw.get("top_logprobs", 0))]
        elif k != "top_logprobs":
            out += [names[k], str(v)]
    return out


def http_body(kw: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in kw.items() if k not in ("json_schema", "logprobs", "top_logprobs")}
    if "json_schema" in kw:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "x", "schema": kw["json_schema"]}}
    if kw.get("logprobs"):
        body["logprobs"] = kw.get("top_logprobs", 0)  # /v1/completions: the number of alternatives
    return body


def summary(choices: list[dict[str, Any]]) -> list[tuple]:
    return [(c["text"], c["finish_reason"], c["n_tokens"], c["logprobs"]) for c in choices]


@pytest.fixture(scope="module")
def server():
    with live_server(model="smollm2-135m", parallel=4, ctx=CTX) as live:
        yield live


def via_model(model, prompt: str, kw: dict[str, Any]) -> list[tuple]:
    r = model.complete(prompt, **kw)
    return summary([{"text": c.text, "finish_reason": c.finish_reason, "n_tokens": len(c.tokens),
                     "logprobs": None if c.logprobs is None else [round(lp.logprob, 9) for lp in c.logprobs]}
                    for c in r.choices])


def via_cli(prompt: str, kw: dict[str, Any]) -> list[tuple]:
    r = cli("run", "smollm2-135m", prompt, "--raw", "--json", "--ctx", str(CTX), *cli_flags(kw))
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    choices = d.get("choices") or [{"text": d["text"], "finish_reason": d["finish_reason"], "tokens": d["tokens"],
                                    "logprobs": d.get("logprobs")}]
    return summary([{"text": c["text"], "finish_reason": c["finish_reason"], "n_tokens": len(c["tokens"]),
                     "logprobs": None if c["logprobs"] is None else [round(x["logprob"], 9) for x in c["logprobs"]]}
                    for c in choices])


def via_http(server, prompt: str, kw: dict[str, Any]) -> list[tuple]:
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
    body = http_body(kw)
    std = {k: body.pop(k) for k in ("max_tokens", "temperature", "top_p", "seed", "stop", "n", "best_of",
                                     "logprobs", "presence_penalty", "frequency_penalty") if k in body}
    r = client.completions.create(model="smollm2-135m", prompt=prompt, extra_body=body, **std)
    # the token count of one choice is in usage only when there is one choice
    out = []
    for c in sorted(r.choices, key=lambda c: c.index):
        lps = c.logprobs.token_logprobs if c.logprobs else None
        n = r.usage.completion_tokens if len(r.choices) == 1 else None
        out.append({"text": c.text, "finish_reason": c.finish_reason, "n_tokens": n,
                    "logprobs": None if lps is None else [round(x, 9) for x in lps]})
    return summary(out)


@pytest.mark.parametrize("prompt,kw", CASES, ids=[next(iter(k for k in kw if k != "max_tokens"), "x")
                                                   + (f"-{kw.get('n', '')}" if "n" in kw else "") for _, kw in CASES])
def test_same_tokens_through_every_door(model, server, prompt: str, kw: dict[str, Any]) -> None:
    model.reset()
    a = via_model(model, prompt, kw)
    b = via_cli(prompt, kw)
    c = via_http(server, prompt, kw)
    assert a == b
    # HTTP reports one token count per response, not per choice
    assert [(t, f, lp) for t, f, _, lp in c] == [(t, f, lp) for t, f, _, lp in a]
    if len(a) == 1:
        assert c[0][2] == a[0][2]
    assert all(x[0] for x in a) or kw.get("stop")  # something was generated


def test_the_table_covers_every_sampling_option() -> None:
    from localllm.sampling import SamplingParams

    covered = {k for _, kw in CASES for k in kw}
    # repeat_last_n, logit_bias and ignore_eos are covered by the flag test (tests/doors/test_flags.py);
    # reasoning_budget needs a reasoning template: tests/clients/test_reasoning.py drives it through the
    # server (OpenAI and Anthropic), Model and `run --reasoning-budget`
    assert set(SamplingParams.names()) - covered <= {"repeat_last_n", "logit_bias", "ignore_eos", "reasoning_budget"}


def test_chat_through_every_door(model, server) -> None:
    msgs = [{"role": "user", "content": "Name a colour."}]
    kw = dict(temperature=0.8, seed=2, max_tokens=16)
    model.reset()
    a = model.chat_complete(msgs, **kw)
    r = cli("run", "smollm2-135m", "Name a colour.", "--chat", "--json", "--ctx", str(CTX), "--temp", "0.8", "--seed",
            "2", "-n", "16")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)
    client = openai.OpenAI(base_url=server.api, api_key="unused", max_retries=0, timeout=120)
    c = client.chat.completions.create(model="smollm2-135m", messages=msgs, temperature=0.8, seed=2, max_tokens=16)
    assert a.text == b["text"] == c.choices[0].message.content
    assert a.tokens == b["tokens"] and a.completion_tokens == c.usage.completion_tokens
