"""The prompt cache on disk (localllm/core/prompt_cache.py), on the default model.

A restored prefix gives the same greedy tokens as decoding the whole prompt;
a new process finds the prefix on disk; a file from another model, a damaged
or truncated file, or a state llama.cpp will not read is refused, deleted and
rebuilt, never trusted."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from localllm.core.lanes import MIN_CHUNK
from localllm.core.prompt_cache import MAGIC, PromptCache
from tests.helpers import ROOT

SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer politely and cite item {i * 7}."
                                                    for i in range(8))
GREEDY = dict(temperature=0, max_tokens=8)


def _msgs(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def _entries(d: Path) -> list[Path]:
    return sorted(d.glob("*/*.kv"))


@pytest.fixture(scope="module")
def reference(default_model_path: Path) -> dict[str, object]:
    """Greedy answers with no cache at all."""
    from localllm import Model

    with Model(default_model_path, n_ctx=1024, prompt_cache=False) as m:
        a = m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
        b = m.chat_complete(_msgs("What is rule 9?"), **GREEDY)
        ids = m.chat_tokens(_msgs("What is rule 3?"))
        eog = set(m.engine.llama.eog_tokens())
    assert a.cached_tokens == 0 and len(ids) == a.prompt_tokens
    # a prefix is reused up to the end of a finished turn (after its <|im_end|>) at least MIN_CHUNK
    # tokens after the previous one: here the system prompt's, since the question is shorter
    ends = [i + 1 for i, t in enumerate(ids) if t in eog]
    last_turn = max(e for e, before in zip(ends, [0] + ends) if e - before >= MIN_CHUNK)
    assert last_turn == ends[0] and a.prompt_tokens - last_turn < 20
    return {"a": a.tokens, "b": b.tokens, "prompt": a.prompt_tokens, "last_turn": last_turn}


RESTART = """
import json, sys
from localllm import Model
sys_text, path, folder = sys.argv[1], sys.argv[2], sys.argv[3]
msgs = lambda q: [{"role": "system", "content": sys_text}, {"role": "user", "content": q}]
with Model(path, n_ctx=1024, prompt_cache=folder) as m:
    a = m.chat_complete(msgs("What is rule 3?"), temperature=0, max_tokens=8)
    m.reset()  # the slot forgets: the next prompt can only come from disk
    b = m.chat_complete(msgs("What is rule 9?"), temperature=0, max_tokens=8)
print(json.dumps({"a": a.tokens, "a_cached": a.cached_tokens, "b": b.tokens, "b_cached": b.cached_tokens}))
"""


def test_a_new_process_restores_the_prefix_and_answers_the_same(tmp_path: Path, default_model_path: Path,
                                                                reference) -> None:
    from localllm import Model

    with Model(default_model_path, n_ctx=1024, prompt_cache=tmp_path) as m:
        first = m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
    assert first.cached_tokens == 0 and first.tokens == reference["a"]
    assert len(_entries(tmp_path)) == 1
    out = subprocess.run([sys.executable, "-c", RESTART, SYSTEM, str(default_model_path), str(tmp_path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # the whole prompt up to its last finished turn came from the file; the answer is the same, token for token
    assert got["a_cached"] == reference["last_turn"]
    assert got["a"] == reference["a"]
    # another conversation with the same system prompt reuses at least the system prompt
    assert got["b_cached"] == reference["last_turn"]
    assert got["b"] == reference["b"]


def _forge(entry: Path, blob: bytes, *, key: str | None = None) -> None:
    """Rewrite ``entry`` with ``blob`` as its state (a valid checksum), keeping its tokens and key unless given."""
    pc = PromptCache(entry.parent.parent, {})
    pc.key_text = json.loads(_header(entry))["key"] if key is None else key
    head = pc._read_header(entry)
    assert head is not None
    new = json.dumps({"key": pc.key_text, "tokens": head["tokens"], "length": len(blob),
                      "sha256": hashlib.sha256(blob).hexdigest()}).encode()
    entry.write_bytes(MAGIC + struct.pack("<I", len(new)) + new + blob)


def _header(entry: Path) -> bytes:
    raw = entry.read_bytes()
    (n,) = struct.unpack("<I", raw[len(MAGIC):len(MAGIC) + 4])
    return raw[len(MAGIC) + 4:len(MAGIC) + 4 + n]


def _tiny_state(tiny_gguf: Path) -> bytes:
    from localllm import runtime

    m = runtime.LlamaModel(tiny_gguf)
    ctx = runtime.Context(m, n_ctx=256, n_threads=1, n_seq_max=1, kv_unified=False)
    b = runtime.Batch(128, 1)
    for i in range(80):
        b.add(5 + i % 20, i, 0, i == 79)
    ctx.decode(b)
    blob = ctx.seq_state(0)
    b.close(), ctx.close(), m.close()
    return blob


def _other_models_entry(tmp: Path) -> bytes:
    """The entry file smollm2-135m:q4_0 writes for the same prompt (same KV layout, other weights)."""
    from localllm import Model, store, resolve

    with Model(resolve.resolve("smollm2-135m:q4_0"), n_ctx=1024, prompt_cache=tmp) as m:
        m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
    (f,) = _entries(tmp)
    return f.read_bytes()


def test_foreign_damaged_or_unreadable_files_are_refused_and_rebuilt(tmp_path: Path, default_model_path: Path,
                                                                     tiny_gguf: Path, reference) -> None:
    from localllm import Model

    d = tmp_path / "cache"
    with Model(default_model_path, n_ctx=1024, prompt_cache=d) as m:
        m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
        pc = m.engine.scheduler.prompt_cache
        pc.flush()  # states are written on a thread of their own
        (entry,) = _entries(d)
        good = entry.read_bytes()
        foreign = _other_models_entry(tmp_path / "q4_0")
        key = json.loads(_header(entry))["key"]
        blob_at = len(good) - json.loads(_header(entry))["length"]
        damage = {
            "another model's file": lambda: entry.write_bytes(foreign),
            "truncated": lambda: entry.write_bytes(good[:len(good) // 2]),
            "a flipped byte": lambda: entry.write_bytes(good[:-100] + bytes([good[-100] ^ 0x40]) + good[-99:]),
            "llama.cpp refuses the state": lambda: _forge(entry, _tiny_state(tiny_gguf), key=key),
            "not a cache file": lambda: entry.write_bytes(b"\0" * blob_at),
        }
        for why, spoil in damage.items():
            spoil()
            m.reset()  # nothing in memory: only the file could supply the prefix,
            pc._entries = None  # and the folder is read again, as by a new process
            refused = pc.stats["refused"]
            r = m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
            assert (why, r.cached_tokens, r.tokens) == (why, 0, reference["a"])
            assert pc.stats["refused"] == refused + 1, why
            pc.flush()
            assert entry.read_bytes() == good, why  # rebuilt: the same state, written again
        m.reset()
        again = m.chat_complete(_msgs("What is rule 3?"), **GREEDY)
        assert (again.cached_tokens, again.tokens) == (reference["last_turn"], reference["a"])  # trusted again


def test_size_cap_evicts_the_least_recently_used(tmp_path: Path) -> None:
    pc = PromptCache(tmp_path, {"model": "m"}, max_bytes=3 * 1000 + 2000)
    blob = bytes(1000)
    a, b, c = ([i] * 70 for i in (1, 2, 3))
    for toks in (a, b, c):
        assert pc.save(toks, blob) is not None
    (ea,) = [e for e in pc._index().values() if e.tokens == a]
    assert pc.load(ea) == blob  # a is used: b is now the oldest
    pc.save([4] * 70, blob)
    left = {e.tokens[0] for e in PromptCache(tmp_path, {"model": "m"})._index().values()}
    assert left == {1, 3, 4}
    # a longer sequence supersedes the entry it extends
    pc.save(a + [9] * 5, blob)
    assert sorted(len(e.tokens) for e in pc._index().values() if e.tokens[0] == 1) == [75]
    # another key sees none of it
    assert PromptCache(tmp_path, {"model": "other"}).lookup(a + [5], have=0) is None
    assert PromptCache(tmp_path, {"model": "m"}).lookup(a + [5], have=0).tokens == a + [9] * 5


def test_a_restarted_server_reports_the_prefix_it_read_from_disk(tmp_path: Path, default_model_path: Path,
                                                                 reference) -> None:
    from localllm.server import ServerSettings, create_app, shutdown

    def ask(question: str) -> dict:
        app = create_app(ServerSettings.create(model=str(default_model_path), ctx=1024, parallel=2,
                                               prompt_cache_dir=str(tmp_path), load_async=False))
        try:
            r = app.test_client().post("/v1/chat/completions", json={
                "messages": _msgs(question), "temperature": 0, "max_tokens": 8})
            assert r.status_code == 200, r.get_data(as_text=True)
            return r.get_json()["usage"]
        finally:
            shutdown(app)  # the state is on disk when the server has stopped

    assert ask("What is rule 3?")["prompt_tokens_details"]["cached_tokens"] == 0
    usage = ask("What is rule 9?")  # a new server: its slots are empty
    assert usage["prompt_tokens_details"]["cached_tokens"] == reference["last_turn"]


def test_prompt_cache_option_is_checked() -> None:
    from localllm import Model
    from localllm.errors import InvalidArgumentError
    from localllm.loader import ModelSettings

    with pytest.raises(InvalidArgumentError, match="prompt_cache must be true, false or a folder"):
        Model(prompt_cache=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="prompt_cache must be true or false"):
        ModelSettings(prompt_cache="yes")  # type: ignore[arg-type]
    assert ModelSettings(prompt_cache_dir="/x").prompt_cache_root() == Path("/x")


NOTES = " ".join(f"Note {i}: the {w} is kept in drawer {i * 3 % 17}, next to the {v}."
                 for i, (w, v) in enumerate(zip(["spoon", "fork", "knife", "plate", "cup", "bowl", "pan", "lid"] * 5,
                                                ["salt", "flour", "rice", "tea", "oil", "sugar", "beans", "honey"] * 5)))
LOGPROBS = dict(temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)


def _numbers(r) -> list[tuple]:
    """The generated tokens with their log-probabilities and top alternatives, as exact floats."""
    return [(t.token, t.logprob, [(a, lp) for a, _, lp in t.top]) for t in r.logprobs]


@pytest.mark.parametrize("name", ["smollm2-135m", "smollm2-135m:q4_0"])
def test_every_reused_prefix_gives_the_numbers_of_a_fresh_decode(tmp_path: Path, name: str) -> None:
    """A prefix reused from memory (a chat's next turn) or from disk (another conversation, a
    restart, a long raw prompt) gives bit for bit the log-probabilities of decoding the whole
    prompt from scratch. (Decoding the prefix in other pieces changes them: flash attention and
    Q4_0's repacked gemm round differently with the number of rows; that flipped a greedy answer.)"""
    from localllm import Model, store, resolve

    path = resolve.resolve(name)
    sys_msg = {"role": "system", "content": SYSTEM + " " + NOTES}
    turn1 = [sys_msg, {"role": "user", "content": "Where is the spoon?"}]
    raw = NOTES + " " + NOTES  # over 512 tokens: reused up to the cut at 512
    asked: list[tuple[str, object, object]] = []
    with Model(path, n_ctx=2048, prompt_cache=tmp_path) as m:
        first = m.chat_complete(turn1, **LOGPROBS)
        turn2 = turn1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And the fork?"}]
        asked.append(("turn 2, from memory", turn2, m.chat_complete(turn2, **LOGPROBS)))
        m.reset()
        asked.append(("turn 2, from disk", turn2, m.chat_complete(turn2, **LOGPROBS)))
        m.reset()
        other = [sys_msg, {"role": "user", "content": "Where is the knife?"}]
        asked.append(("the system prompt, from disk", other, m.chat_complete(other, **LOGPROBS)))
        m.complete(raw + " The spoon", **LOGPROBS)
        asked.append(("a long raw prompt, from memory", raw + " The cup", m.complete(raw + " The cup", **LOGPROBS)))
        m.reset()
        asked.append(("a long raw prompt, from disk", raw + " The pan", m.complete(raw + " The pan", **LOGPROBS)))
    with Model(path, n_ctx=2048, prompt_cache=False) as fresh:
        for what, prompt, got in asked:
            fresh.reset()
            want = fresh.complete(prompt, **LOGPROBS) if isinstance(prompt, str) else \
                fresh.chat_complete(prompt, **LOGPROBS)
            assert want.cached_tokens == 0 and got.cached_tokens >= 64, what
            assert _numbers(got) == _numbers(want), what


def test_cuts_depend_only_on_the_tokens_before_them() -> None:
    """What makes reuse exact: a prompt and any prompt sharing its first n tokens agree on every cut
    below n, and chunks are at most the unit long."""
    import random

    from localllm.core.lanes import cuts, reuse_point

    rng = random.Random(5)
    for _ in range(200):
        toks = [0 if rng.random() < 0.03 else rng.randrange(1, 50) for _ in range(rng.randrange(2, 400))]
        full = cuts(toks, eog={0}, unit=128)
        bounds = [0] + full + [len(toks)]
        assert all(0 < b - a <= 128 for a, b in zip(bounds, bounds[1:]))
        assert all(c % 128 == 0 or (toks[c - 1] == 0 and c - a >= MIN_CHUNK) for a, c in zip([0] + full, full))
        n = rng.randrange(1, len(toks) + 1)
        other = toks[:n] + [rng.randrange(0, 50) for _ in range(rng.randrange(1, 100))]
        assert [c for c in full if c < n] == [c for c in cuts(other, eog={0}, unit=128) if c < n]
    # a caller's own cuts are reused only by a caller making the same ones
    prompt, pc = list(range(1, 300)), [128, 256]
    assert reuse_point(prompt, 256, prompt, pc) == 256
    assert reuse_point(prompt, 256, prompt, sorted(pc + [100]), held_extra=(100,), extra=(100,)) == 256
    assert reuse_point(prompt, 256, prompt, pc, held_extra=(100,)) == 0
    assert reuse_point(prompt, 256, prompt, pc, held_extra=(200,), extra=()) == 128
