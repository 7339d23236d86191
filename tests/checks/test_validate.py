"""The bounded GGUF header check: hand-crafted hostile headers, truncation,
fuzzing (only InvalidModelFileError may ever escape) and speed."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from localllm import validate
from localllm.errors import InvalidModelFileError

U32, U64, STR, ARR, F32_T, Q8_0_T = 4, 10, 8, 9, 0, 8


def s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def tensor(name: str, shape: tuple[int, ...], ttype: int = F32_T, offset: int = 0) -> bytes:
    return (s(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", d) for d in shape)
            + struct.pack("<IQ", ttype, offset))


ARCH = kv("general.architecture", STR, s("llama"))


def build(kvs: list[bytes] | None = None, tensors: list[bytes] | None = None, *, n_kv: int | None = None,
          n_tensors: int | None = None, data: bytes = b"\0" * 64, version: int = 3, magic: bytes = b"GGUF",
          align: int = 32) -> bytes:
    kvs = [ARCH] if kvs is None else kvs
    tensors = [tensor("a", (16,))] if tensors is None else tensors
    head = (magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors))
    pad = (-len(head)) % align
    return head + b"\0" * pad + data


def check(tmp_path: Path, blob: bytes) -> validate.Header:
    f = tmp_path / "m.gguf"
    f.write_bytes(blob)
    return validate.read_header(f)


def test_minimal_valid(tmp_path: Path) -> None:
    h = check(tmp_path, build())
    assert h.arch == "llama" and [t.name for t in h.tensors] == ["a"] and h.tensors[0].nbytes == 64


@pytest.mark.parametrize("blob, problem", [
    (b"", "only 0 bytes"),
    (b"GGML" + b"\0" * 40, "magic"),
    (build(version=1), "version 1"),
    (build(version=4), "version 4"),
    (build(n_kv=2**62), "implausible key/value count"),
    (build(n_tensors=2**40), "implausible tensor count"),
    (build(n_kv=5), "past the end|empty"),  # claims more keys than present
    (build([s("general.architecture") + struct.pack("<I", STR) + struct.pack("<Q", 2**63)]), "past the end"),
    (build([struct.pack("<Q", 2**64 - 1) + b"x"]), "past the end"),  # huge key length
    (build([ARCH, kv("x", 13, b"\0" * 8)]), "unknown value type 13"),
    (build([ARCH, kv("x", ARR, struct.pack("<IQ", U32, 2**61))]), "past the end"),
    (build([ARCH, kv("x", ARR, struct.pack("<IQ", STR, 2**60))]), "past the end"),
    (build([ARCH, kv("x", ARR, struct.pack("<IQ", STR, 2) + s("ok") + struct.pack("<Q", 10**9))]), "past the end"),
    (build([ARCH, kv("x", ARR, struct.pack("<IQ", ARR, 1) + struct.pack("<IQ", U32, 0))]), "element type 9"),
    (build([ARCH, kv("x", ARR, struct.pack("<IQ", 77, 1))]), "element type 77"),
    (build([ARCH, kv("k", STR, s(b"\xff\xfe"))]), "not UTF-8"),
    (build([ARCH, ARCH]), "appears twice"),
    (build([kv("general.name", STR, s("x"))]), "general.architecture is missing"),
    (build([kv("general.architecture", U32, struct.pack("<I", 7))]), "not a string"),
    (build([ARCH, kv("general.alignment", U32, struct.pack("<I", 24))]), "power of two"),
    (build([ARCH, kv("general.alignment", U32, struct.pack("<I", 0))]), "power of two"),
    (build([ARCH, kv("llama.block_count", U64, struct.pack("<Q", 2**60))]), "block_count"),
    (build([ARCH, kv("llama.embedding_length", STR, s("576"))]), "embedding_length"),
    (build([ARCH, kv("llama.context_length", 6, struct.pack("<f", 4096.0))]), "context_length"),
    (build(tensors=[tensor("a", ())]), "0 dimensions"),
    (build(tensors=[tensor("a", (1, 1, 1, 1, 1))]), "5 dimensions"),
    (build(tensors=[tensor("a", (16,), ttype=200)]), "unknown type 200"),
    (build(tensors=[tensor("a", (0,))]), "implausible shape"),
    (build(tensors=[tensor("a", (2**41,))]), "implausible shape"),
    (build(tensors=[tensor("a", (2**40, 2**40, 2**40, 2**40))]), "past the end"),  # product overflows int64
    (build(tensors=[tensor("a", (16,), ttype=Q8_0_T)]), "block size 32"),
    (build(tensors=[tensor("a", (16,), offset=8)]), "not aligned"),
    (build(tensors=[tensor("a", (16,), offset=2**63)]), "past the end"),
    (build(tensors=[tensor("a", (32,))]), "past the end"),  # 128 bytes, 64 present
    (build(tensors=[tensor("a", (16,)), tensor("b", (16,), offset=32)], data=b"\0" * 128), "overlap"),
    (build(tensors=[tensor("a", (8,)), tensor("a", (8,), offset=32)]), "appears twice"),
    (build(tensors=[s("a") + struct.pack("<I", 1)], data=b""), "past the end|implausible"),  # shape missing
])
def test_hostile_headers(tmp_path: Path, blob: bytes, problem: str) -> None:
    with pytest.raises(InvalidModelFileError, match=problem):
        check(tmp_path, blob)


def test_error_names_file_and_reason(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelFileError) as ei:
        check(tmp_path, build(version=9))
    assert str(tmp_path / "m.gguf") in str(ei.value) and ei.value.reason and ei.value.hint


def test_every_truncation_of_a_real_header_is_rejected(tiny_gguf: Path, tmp_path: Path) -> None:
    blob = tiny_gguf.read_bytes()
    h = validate.read_header(tiny_gguf)
    f = tmp_path / "t.gguf"
    for n in list(range(0, h.data_offset + 64, 13)) + [len(blob) - 1]:
        f.write_bytes(blob[:n])
        with pytest.raises(InvalidModelFileError):
            validate.read_header(f)


def test_header_only_never_reads_tensor_data(tmp_path: Path) -> None:
    # a valid header promising 8 GiB of tensor data in a sparse file: parsing must not touch it
    n = 2**31  # F32 elements → 8 GiB
    f = tmp_path / "big.gguf"
    f.write_bytes(build(tensors=[tensor("w", (n,))], data=b""))
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size + 4 * n)
    t = time.perf_counter()
    h = validate.read_header(f)
    assert time.perf_counter() - t < 0.5
    assert h.tensors[0].nbytes == 4 * n


def test_real_models_parse_fast(default_model_path: Path) -> None:
    t = time.perf_counter()
    h = validate.read_header(default_model_path)
    assert time.perf_counter() - t < 1.0
    assert h.arch == "llama" and h.parameters == 134515008


def test_model_never_hands_an_invalid_file_to_llama_cpp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from localllm import Model, runtime

    def boom(*a: object, **k: object) -> None:
        raise AssertionError("llama.cpp was asked to load an invalid file")

    monkeypatch.setattr(runtime, "LlamaModel", boom)
    f = tmp_path / "evil.gguf"
    f.write_bytes(build(tensors=[tensor("a", (16,)), tensor("b", (16,), offset=32)], data=b"\0" * 128))
    with pytest.raises(InvalidModelFileError, match="overlap"):
        Model(f)


# ---------------------------------------------------------------- fuzzing

def _only_invalid_model_file(path: Path) -> None:
    try:
        validate.read_header(path)
    except InvalidModelFileError:
        pass


@pytest.fixture(scope="module")
def small_header(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    from tests.helpers import write_tiny_llama

    p = write_tiny_llama(tmp_path_factory.mktemp("fz") / "t.gguf", n_embd=32, n_ff=64, n_layer=1)
    return p.read_bytes()


_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ
@given(data=st.data())
def test_fuzz_mutated_real_header(small_header: bytes, tmp_path: Path, data: st.DataObject) -> None:
    blob = bytearray(small_header)
    hlen = validate.read_header(_write(tmp_path, small_header)).data_offset
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, hlen - 1))
        blob[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    _only_invalid_model_file(_write(tmp_path, bytes(blob)))


@_FUZZ
@given(body=st.binary(max_size=512), version=st.sampled_from([2, 3]),
       counts=st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)))
def test_fuzz_random_body(tmp_path: Path, body: bytes, version: int, counts: tuple[int, int]) -> None:
    blob = b"GGUF" + struct.pack("<IQQ", version, *counts) + body
    _only_invalid_model_file(_write(tmp_path, blob))


@_FUZZ
@given(vtype=st.integers(0, 20), etype=st.integers(0, 20), count=st.integers(0, 2**64 - 1),
       dims=st.lists(st.integers(0, 2**64 - 1), max_size=6), ttype=st.integers(0, 50),
       offset=st.integers(0, 2**64 - 1), payload=st.binary(max_size=32))
def test_fuzz_structured(tmp_path: Path, vtype: int, etype: int, count: int, dims: list[int], ttype: int,
                         offset: int, payload: bytes) -> None:
    kvs = [ARCH, kv("x", vtype, payload), kv("y", ARR, struct.pack("<IQ", etype, count) + payload)]
    t = s("t") + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", ttype, offset)
    _only_invalid_model_file(_write(tmp_path, build(kvs, [t])))


def _write(tmp_path: Path, blob: bytes) -> Path:
    f = tmp_path / "fuzz.gguf"
    f.write_bytes(blob)
    return f
