"""Every flag of ``localllm serve`` and ``localllm run`` reaches the runtime.

The commands run in-process with every option set away from its default; we
watch what arrives where llama.cpp is called (the model, the context, the
scheduler's requests) and what the running app does. Each table must name
every option of its command, so a new flag cannot be added without a check."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from localllm import runtime
from localllm.core.scheduler import Scheduler


@pytest.fixture
def spies(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    """Record the arguments of every llama.cpp model/context created and every request submitted."""
    from localllm import placement

    seen: dict[str, list[dict[str, Any]]] = {"model": [], "context": [], "request": [], "placement": []}
    model_init, ctx_init, submit = runtime.LlamaModel.__init__, runtime.Context.__init__, Scheduler.submit
    explain = placement.explain

    def on_model(self, path, **kw):
        seen["model"].append({"path": str(path), **kw})
        model_init(self, path, **kw)

    def on_ctx(self, model, **kw):
        seen["context"].append(kw)
        ctx_init(self, model, **kw)

    def on_submit(self, req):
        seen["request"].append({"params": req.params, "prompt": req.prompt, "model": self.model,
                                "prompt_cache": self.prompt_cache, "speculate": self.speculate,
                                "prefill": (self.prefill.mode, self.prefill.gap)})
        return submit(self, req)

    def on_explain(path, requested, n_ctx, gpu_memory=None, **kw):
        seen["placement"].append({"requested": requested, "gpu_memory": gpu_memory})
        return explain(path, requested, n_ctx, gpu_memory=gpu_memory, **kw)

    monkeypatch.setattr(placement, "explain", on_explain)
    monkeypatch.setattr(runtime.LlamaModel, "__init__", on_model)
    monkeypatch.setattr(runtime.Context, "__init__", on_ctx)
    monkeypatch.setattr(Scheduler, "submit", on_submit)
    return seen


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Path:
    from localllm import store

    root = tmp_path_factory.mktemp("store")
    store.import_file(tiny_gguf, "tiny", "v1", root=root)
    return root


# ---------------------------------------------------------------------- serve

def _serve(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> dict[str, Any]:
    """Run `localllm serve ARGS` until it would start listening; return what it built."""
    import localllm.cli.serve as serve_mod

    got: dict[str, Any] = {}

    def fake_serve_app(app, cfg, server_kind, parallel, max_queue):
        state = app.extensions["localllm"]
        state.loaded.wait(120)
        got.update(app=app, cfg=cfg, server_kind=server_kind, engine=state.engine, error=state.load_error,
                   client=app.test_client())
        # drive the real app a little while it is up
        c = got["client"]
        got["models_noauth"] = c.get("/v1/models").status_code
        got["models"] = c.get("/v1/models", headers={"Authorization": "Bearer k3y"})
        got["cors"] = c.get("/health", headers={"Origin": "http://app.example"}).headers.get(
            "Access-Control-Allow-Origin")
        got["big_body"] = c.post("/v1/completions", data=b"x" * 5000, content_type="application/json",
                                 headers={"Authorization": "Bearer k3y"}).status_code
        from localllm.server import shutdown

        shutdown(app)

    monkeypatch.setattr(serve_mod, "serve_app", fake_serve_app)
    r = CliRunner().invoke(serve_mod.command, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    got["output"] = r.output
    return got


SERVE_CHECKS = {
    "model_path": lambda g, s, p: g["engine"].info.path == str(p),
    "host": lambda g, s, p: g["cfg"].host == "0.0.0.0",
    # a key was given, so no warning; without one, test_insecure_serves_a_public_address_and_warns
    "insecure": lambda g, s, p: "WITHOUT an API key" not in g["output"] and g["cfg"].host == "0.0.0.0",
    "port": lambda g, s, p: g["cfg"].port == 9999,
    "api_key": lambda g, s, p: g["models_noauth"] == 401 and g["models"].status_code == 200,
    "parallel": lambda g, s, p: (g["engine"].info.sequences == 3 and g["engine"].scheduler.n_slots == 3
                                 and any(c.get("n_seq_max") == 3 for c in s["context"])),
    "max_queue": lambda g, s, p: g["engine"].scheduler.max_queue == 5,
    "cors_origins": lambda g, s, p: g["cors"] == "http://app.example",
    "max_body_bytes": lambda g, s, p: g["big_body"] == 413,
    "repack": lambda g, s, p: s["model"][-1]["use_extra_bufts"] is False and g["engine"].info.repack is False,
    "mmap": lambda g, s, p: s["model"][-1]["use_mmap"] is True and g["engine"].info.mmap is True,
    "aliases": lambda g, s, p: (g["models"].get_json()["data"][0]["id"] == "my-model"
                                and g["cfg"].model_map == (("gpt-*", "smollm2-135m"),)),
    "server_kind": lambda g, s, p: g["server_kind"] == "werkzeug",
    "n_ctx": lambda g, s, p: (g["engine"].info.context == 384
                              and any(c.get("n_ctx") == 384 * 3 for c in s["context"])),
    "n_threads": lambda g, s, p: (g["engine"].info.threads == 1
                                  and all(c.get("n_threads") == 1 for c in s["context"])),
    "cache_type_k": lambda g, s, p: (any(c.get("cache_type_k") == "q8_0" for c in s["context"])
                                     and g["engine"].info.cache_type_k == "q8_0"),
    "cache_type_v": lambda g, s, p: (any(c.get("cache_type_v") == "q4_0" for c in s["context"])
                                     and g["engine"].info.cache_type_v == "q4_0"),
    "flash_attn": lambda g, s, p: (any(c.get("flash_attn") is True for c in s["context"])
                                   and g["engine"].info.flash_attn == "on"),
    "prompt_cache": lambda g, s, p: (g["engine"].scheduler.prompt_cache is None
                                     and g["engine"].info.prompt_cache is False),
    "drain_timeout": lambda g, s, p: g["cfg"].drain_timeout == 7.5,
    "speculate": lambda g, s, p: g["engine"].scheduler.speculate is True and g["engine"].info.speculate == "on",
    "prefill": lambda g, s, p: (g["engine"].scheduler.prefill.mode == "fair" and g["engine"].scheduler.prefill.gap == 3
                                and g["engine"].info.prefill == "fair:3"),
    # the cap reaches the one placement path (it bounds "auto"; --gpu-layers 20 here is explicit)
    "gpu_memory": lambda g, s, p: (s["placement"][-1]["gpu_memory"] == 3 << 30
                                   and g["engine"].info.gpu_memory == 3 << 30),
    "gpu_layers": lambda g, s, p: (s["model"][-1]["n_gpu_layers"] == 20
                                   and g["engine"].info.gpu_layers_requested == 20
                                   and (runtime.supports_gpu_offload() or g["engine"].info.gpu_layers == 0)),
}


def test_every_serve_flag_arrives(monkeypatch: pytest.MonkeyPatch, spies, default_model_path: Path) -> None:
    from localllm import hardware
    from localllm.cli.serve import command

    monkeypatch.setattr(hardware, "weights_in_memory", lambda: True)  # so that --mmap is not the default

    # the --all-models flags change the serving mode: test_all_models_flags_arrive checks them
    names = {p.name for p in command.params
             if p.name not in ("help", "model", "models_dir", "all_models", "max_memory", "keep_alive")}
    assert names == set(SERVE_CHECKS), names ^ set(SERVE_CHECKS)
    g = _serve(monkeypatch, [
        "--model-path", str(default_model_path), "--host", "0.0.0.0", "--insecure", "--port", "9999",
        "--api-key", "k3y", "--parallel", "3", "--max-queue", "5", "--cors-origin", "http://app.example",
        "--max-body", "2048", "--no-repack", "--alias", "my-model", "--alias", "gpt-*=smollm2-135m", "--server", "werkzeug", "--ctx", "384",
        "--threads", "1", "--gpu-layers", "20", "--gpu-memory", "3GiB", "--cache-type-k", "q8_0", "--cache-type-v", "q4_0", "--drain-timeout", "7.5",
        "--flash-attn", "on", "--no-prompt-cache", "--speculate", "on", "--prefill", "fair:3", "--mmap"])
    assert g["error"] is None, g["error"]
    failed = [name for name, check in SERVE_CHECKS.items() if not check(g, spies, default_model_path)]
    assert not failed


def test_all_models_flags_arrive(monkeypatch: pytest.MonkeyPatch, spies, default_model_path: Path) -> None:
    g = _serve(monkeypatch, ["smollm2-135m", "--all-models", "--max-memory", "3G", "--keep-alive", "7",
                             "--ctx", "128", "--parallel", "1"])
    assert g["error"] is None, g["error"]
    pool = g["app"].extensions["localllm"].pool
    assert (g["cfg"].all_models, g["cfg"].max_memory, g["cfg"].keep_alive) == (True, 3 << 30, 7.0)
    assert pool is not None and (pool.max_memory, pool.keep_alive) == (3 << 30, 7.0)
    assert any(m["loaded"] and m["id"].startswith("smollm2-135m:") for m in g["models"].get_json()["data"])
    from localllm.cli.serve import command

    r = CliRunner().invoke(command, ["--keep-alive", "5"])
    assert r.exit_code == 2 and "need --all-models" in r.output


def test_insecure_serves_a_public_address_and_warns(monkeypatch: pytest.MonkeyPatch, spies,
                                                     default_model_path: Path) -> None:
    g = _serve(monkeypatch, ["--model-path", str(default_model_path), "--host", "0.0.0.0", "--insecure",
                             "--ctx", "128", "--parallel", "1"])
    assert g["cfg"].host == "0.0.0.0" and g["cfg"].api_key is None
    assert "WITHOUT an API key" in g["output"]
    assert g["models_noauth"] == 200


def test_serve_model_name_and_models_dir_arrive(monkeypatch: pytest.MonkeyPatch, spies, store_dir: Path) -> None:
    g = _serve(monkeypatch, ["tiny", "--models-dir", str(store_dir), "--ctx", "128", "--parallel", "1"])
    assert g["engine"].info.id == "tiny:v1"
    assert Path(spies["model"][-1]["path"]).is_relative_to(store_dir)


# ---------------------------------------------------------------------- run

def _run(args: list[str]) -> Any:
    from localllm.cli.run import command

    return CliRunner().invoke(command, args, catch_exceptions=False)


RUN_SAMPLING = ["-n", "7", "--temp", "0.5", "--top-p", "0.9", "--top-k", "7", "--min-p", "0.1",
                "--repeat-penalty", "1.2", "--presence-penalty", "0.3", "--frequency-penalty", "0.4",
                "--repeat-last-n", "32", "--seed", "77", "--stop", "zzz", "--stop", "qqq",
                "--grammar", 'root ::= [a-z ]+', "--logit-bias", "5=1.5", "--choices", "2",
                "--best-of", "3", "--logprobs", "2", "--reasoning-budget", "5"]

RUN_CHECKS = {
    "max_tokens": lambda p, o: p.max_tokens == 7,
    "temperature": lambda p, o: p.temperature == 0.5,
    "top_p": lambda p, o: p.top_p == 0.9,
    "top_k": lambda p, o: p.top_k == 7,
    "min_p": lambda p, o: p.min_p == 0.1,
    "repeat_penalty": lambda p, o: p.repeat_penalty == 1.2,
    "presence_penalty": lambda p, o: p.presence_penalty == 0.3,
    "frequency_penalty": lambda p, o: p.frequency_penalty == 0.4,
    "repeat_last_n": lambda p, o: p.repeat_last_n == 32,
    "seed": lambda p, o: p.seed == 77,
    "stop": lambda p, o: p.stop == ("zzz", "qqq"),
    "grammar": lambda p, o: p.grammar == "root ::= [a-z ]+",
    "logit_bias": lambda p, o: p.logit_bias == {5: 1.5},
    "n": lambda p, o: p.n == 2 and len(o["choices"]) == 2,
    "best_of": lambda p, o: p.best_of == 3,
    "top_logprobs": lambda p, o: p.logprobs and p.top_logprobs == 2 and len(o["choices"][0]["logprobs"][0]["top"]) == 2,
    "as_json": lambda p, o: isinstance(o, dict),
    "reasoning_budget": lambda p, o: p.reasoning_budget == 5,
}


def test_every_run_flag_arrives(monkeypatch: pytest.MonkeyPatch, spies, tiny_gguf: Path, store_dir: Path) -> None:
    from localllm import hardware
    from localllm.cli.run import command

    monkeypatch.setattr(hardware, "weights_in_memory", lambda: True)  # so that --mmap is not the default

    other = {"model", "prompt", "chat", "system", "n_ctx", "n_threads", "gpu_layers", "gpu_memory", "models_dir", "repack",
             "json_schema", "num_beams", "ignore_eos", "cache_type_k", "cache_type_v", "flash_attn",
             "prompt_cache", "speculate", "prefill", "mmap", "hide_reasoning"}
    names = {p.name for p in command.params if p.name != "help"}
    assert names == set(RUN_CHECKS) | other, names ^ (set(RUN_CHECKS) | other)
    r = _run(["smollm2-135m", "Say hi", "--raw", "--json", *RUN_SAMPLING])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    params = spies["request"][-1]["params"]
    assert spies["request"][-1]["prompt_cache"] is not None  # on by default
    assert spies["request"][-1]["speculate"] is False  # off by default
    assert spies["request"][-1]["prefill"] == ("exact", 0.0)  # the default
    failed = [name for name, check in RUN_CHECKS.items() if not check(params, out)]
    assert not failed

    # the schema and beams (which exclude penalties and n) in a run of their own
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}
    r = _run(["smollm2-135m", "JSON:", "--raw", "--json", "-n", "24", "--num-beams", "2",
              "--json-schema", json.dumps(schema)])
    assert r.exit_code == 0, r.output
    p = spies["request"][-1]["params"]
    assert p.num_beams == 2 and p.json_schema == schema
    assert isinstance(json.loads(json.loads(r.output)["text"])["a"], bool)

    # chat, system and the model flags
    r = _run(["smollm2-135m", "Hello there", "--chat", "--system", "You are Zed.", "--json", "-n", "2",
              "--ctx", "320", "--threads", "1", "--gpu-layers", "9", "--gpu-memory", "1.5G", "--no-repack", "--ignore-eos",
              "--cache-type-k", "bf16", "--cache-type-v", "q8_0", "--flash-attn", "on", "--no-prompt-cache",
              "--speculate", "on", "--prefill", "fair:3", "--mmap"])
    assert r.exit_code == 0, r.output
    assert spies["request"][-1]["params"].ignore_eos is True
    assert spies["request"][-1]["prompt_cache"] is None
    assert spies["request"][-1]["speculate"] is True
    assert spies["request"][-1]["prefill"] == ("fair", 3.0)
    req = spies["request"][-1]
    text = req["model"].detokenize(req["prompt"], special=True).decode()
    assert "You are Zed." in text and "Hello there" in text and "<|im_start|>assistant" in text
    assert spies["model"][-1]["n_gpu_layers"] == 9 and spies["model"][-1]["use_extra_bufts"] is False
    assert spies["model"][-1]["use_mmap"] is True
    assert spies["placement"][-1] == {"requested": 9, "gpu_memory": 3 << 29}
    assert spies["context"][-1]["n_ctx"] == 320 and spies["context"][-1]["n_threads"] == 1
    assert (spies["context"][-1]["cache_type_k"], spies["context"][-1]["cache_type_v"],
            spies["context"][-1]["flash_attn"]) == ("bf16", "q8_0", True)
    r = _run(["smollm2-135m", "Hello there", "--raw", "--json", "-n", "2"])
    req = spies["request"][-1]
    assert "<|im_start|>" not in req["model"].detokenize(req["prompt"], special=True).decode()

    # a store name under --models-dir
    r = _run(["tiny", "the cat", "--models-dir", str(store_dir), "--json", "-n", "2", "--raw"])
    assert r.exit_code == 0, r.output
    assert Path(spies["model"][-1]["path"]).is_relative_to(store_dir)


# ---------------------------------------------------------------------- --gpu-memory at every door

def test_gpu_memory_reaches_every_door(monkeypatch: pytest.MonkeyPatch, spies, tiny_gguf: Path) -> None:
    """``Model(gpu_memory=...)`` and ``plan --gpu-memory`` (run and serve: the tables above) reach placement."""
    from localllm import Model, plan
    from localllm.cli import cli, register_commands

    with Model(tiny_gguf, n_ctx=64, gpu_memory="2GiB", prompt_cache=False) as m:
        assert m.info.gpu_memory == 2 << 30
    assert spies["placement"][-1] == {"requested": "auto", "gpu_memory": 2 << 30}
    seen = []
    make_plan = plan.make_plan
    monkeypatch.setattr(plan, "make_plan", lambda *a, **kw: seen.append(kw.get("gpu_memory")) or make_plan(*a, **kw))
    register_commands()
    r = CliRunner().invoke(cli, ["plan", str(tiny_gguf), "--gpu-memory", "512MB", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen == [512 * 10**6]


@pytest.mark.parametrize("mmap", [True, False])
def test_mmap_reaches_every_door(monkeypatch: pytest.MonkeyPatch, spies, tiny_gguf: Path, mmap: bool) -> None:
    """``Model(mmap=...)``, ``plan --mmap/--no-mmap`` and the --all-models pool's plan (run and serve: the
    tables above); without it each door asks hardware.weights_in_memory."""
    from localllm import Model, hardware, plan
    from localllm.cli import cli, register_commands
    from localllm.loader import ModelSettings
    from localllm.server.pool import ModelPool

    with Model(tiny_gguf, n_ctx=64, prompt_cache=False, mmap=mmap) as m:
        assert m.info.mmap is mmap and spies["model"][-1]["use_mmap"] is mmap
    monkeypatch.setattr(hardware, "weights_in_memory", lambda: mmap)  # auto now says the opposite
    with Model(tiny_gguf, n_ctx=64, prompt_cache=False) as m:
        assert m.info.mmap is not mmap and spies["model"][-1]["use_mmap"] is not mmap
    seen = []
    make_plan = plan.make_plan
    monkeypatch.setattr(plan, "make_plan", lambda *a, **kw: seen.append(kw.get("mmap")) or make_plan(*a, **kw))
    register_commands()
    flag = "--mmap" if mmap else "--no-mmap"
    r = CliRunner().invoke(cli, ["plan", str(tiny_gguf), flag, "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert seen == [mmap] and json.loads(r.output)["mmap"] is mmap
    r = CliRunner().invoke(cli, ["plan", str(tiny_gguf), "--json"], catch_exceptions=False)
    assert seen[-1] is None and json.loads(r.output)["mmap"] is not mmap  # auto: make_plan decides
    ModelPool(ModelSettings(n_ctx=64, mmap=mmap), max_memory=1 << 30).plan(tiny_gguf)
    assert seen[-1] is mmap


def test_auto_maps_a_model_that_would_not_fit_in_memory(monkeypatch: pytest.MonkeyPatch, spies,
                                                         default_model_path: Path) -> None:
    """Read into memory, a model larger than the RAM available would be killed by the kernel; mapped,
    its page cache can be dropped and read again. Auto maps it and says why; ``mmap=False`` is obeyed."""
    from localllm import Model, hardware, plan
    from localllm.validate import read_header

    monkeypatch.setattr(hardware, "weights_in_memory", lambda: True)
    need = plan.estimate(read_header(default_model_path), 256, mmap=False).ram_bytes
    for available, mapped in ((need - (8 << 20), True), (need + (64 << 20), False)):
        monkeypatch.setattr(hardware, "memory", lambda a=available: {"total": 1 << 40, "available": a})
        with pytest.warns(RuntimeWarning) if mapped else warnings.catch_warnings(record=True) as caught:
            with Model(default_model_path, n_ctx=256, prompt_cache=False) as m:
                assert m.info.mmap is mapped and spies["model"][-1]["use_mmap"] is mapped
        notes = [str(w.message) for w in caught if "not read into huge pages" in str(w.message)]
        assert len(notes) == int(mapped), notes
    monkeypatch.setattr(hardware, "memory", lambda: {"total": 1 << 40, "available": need - (8 << 20)})
    with Model(default_model_path, n_ctx=256, prompt_cache=False, mmap=False) as m:  # asked: obeyed
        assert m.info.mmap is False


def test_bad_mmap_is_refused(tiny_gguf: Path) -> None:
    from localllm import Model
    from localllm.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError, match="mmap must be true, false or None"):
        Model(tiny_gguf, mmap="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["-1", "-2GiB", "lots", "2 parsecs", ""])
def test_bad_gpu_memory_is_a_one_line_error(bad: str, tiny_gguf: Path) -> None:
    from localllm import Model
    from localllm.cli import cli, register_commands
    from localllm.errors import InvalidArgumentError

    register_commands()
    for cmd in (["plan", str(tiny_gguf)], ["run", str(tiny_gguf), "hi"], ["serve", str(tiny_gguf)]):
        r = CliRunner().invoke(cli, [*cmd, "--gpu-memory", bad])
        assert r.exit_code == 2 and "gpu memory must be a size" in r.output, (cmd, r.output)
        assert len([ln for ln in r.output.splitlines() if "Error" in ln]) == 1
    with pytest.raises(InvalidArgumentError, match="gpu memory must be a size"):
        Model(tiny_gguf, gpu_memory=bad)
    with pytest.raises(ValueError):
        Model(tiny_gguf, gpu_memory=-1)


def test_prefill_reaches_every_door_and_bad_values_are_one_line_errors(spies, tiny_gguf: Path) -> None:
    """``Model(prefill=...)`` reaches the scheduler (run and serve: the tables above); a bad value
    is refused with one line at each door."""
    from localllm import Model
    from localllm.cli import cli, register_commands
    from localllm.errors import InvalidArgumentError

    with Model(tiny_gguf, n_ctx=64, prompt_cache=False, prefill="fair:7.5") as m:
        assert m.info.prefill == "fair:7.5" and m.engine.scheduler.prefill.mode == "fair"
        assert m.engine.scheduler.prefill.gap == 7.5
        # fair's flash attention auto is off (llama.cpp's CPU kernel is slow for its small pieces)
        assert m.info.flash_attn == "off" and spies["context"][-1]["flash_attn"] is False
        m.generate("the cat", max_tokens=2)
    assert spies["request"][-1]["prefill"] == ("fair", 7.5)
    from localllm.loader import ModelSettings

    assert ModelSettings(model=tiny_gguf, prefill="fair", cache_type_v="q8_0").flash_attn_on() is None  # needed
    assert ModelSettings(model=tiny_gguf, prefill="fair", flash_attn="on").flash_attn_on() is True
    assert ModelSettings(model=tiny_gguf).flash_attn_on() is None  # exact: llama.cpp's auto
    with Model(tiny_gguf, n_ctx=64, prompt_cache=False) as m:
        assert m.info.prefill == "exact" and m.engine.scheduler.prefill.mode == "exact"
    with Model(tiny_gguf, n_ctx=64, prompt_cache=False, prefill="fair") as m:
        assert m.info.prefill == "fair" and m.engine.scheduler.prefill.gap == 2   # fair is fair:2
    assert ModelSettings(model=tiny_gguf, prefill="fair:1000").prefill_mode() == "fair"   # the largest K
    for bad in ("fast", "fair:1", "fair:0.5", "fair:x", "fair:nan", "fair:inf", "fair:", "exact:2", "fair: 3",
                "fair:1e3", "fair:-2", "fair:1_0", " fair", "fair:1001"):
        with pytest.raises(InvalidArgumentError, match="prefill must be exact, fair or fair:K"):
            Model(tiny_gguf, prefill=bad)
    register_commands()
    for cmd in (["run", str(tiny_gguf), "hi"], ["serve", str(tiny_gguf)]):
        for bad in ("fast", "fair:1"):
            r = CliRunner().invoke(cli, [*cmd, "--prefill", bad])
            assert r.exit_code == 2 and "prefill must be exact, fair or fair:K" in r.output, (cmd, r.output)
            assert f"(got '{bad}')" in r.output
            assert len([ln for ln in r.output.splitlines() if "Error" in ln]) == 1
