"""Seeded GGUF mutations and a crash-proof worker that loads them.

- :func:`layout` finds the byte offset of every field of a real GGUF header
  (its own small parser, independent of ``localllm.validate``).
- :func:`mutations` turns a layout into deterministic :class:`Mutation` s, by
  family: truncation at every section boundary, counts and lengths set huge or
  "negative", offsets past the end, unknown types, overlapping tensors,
  hyperparameters, random bytes in the header, and hostile chat templates.
- :func:`run_jobs` loads many mutated files in ONE worker subprocess
  (``python tests/gguf_fuzz.py JOBS START FD``) that reports each stage over a
  pipe; a worker killed by a signal (or stuck) is recorded against the file
  and stage it was working on, and a fresh worker goes on with the rest.

Stages per file: ``check`` (localllm.validate.read_header), ``model``
(``localllm.Model``: load, then generate or chat), and ``raw``: llama.cpp
alone (``runtime.LlamaModel``, no header check), only for files the check
rejects, to count what the check saves llama.cpp from.
"""

from __future__ import annotations

import json
import os
import queue
import random
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = range(13)
_SCALAR_SIZE = {U8: 1, I8: 1, U16: 2, I16: 2, U32: 4, I32: 4, F32: 4, BOOL: 1, U64: 8, I64: 8, F64: 8}
HUGE64 = (2**64 - 1, 2**63, 2**40)          # -1 and INT64_MIN as int64, and merely huge


# --------------------------------------------------------------------------- layout

@dataclass
class KV:
    key: str
    start: int          # the key's length field
    type_at: int
    value_at: int       # the value (for an array: its element type)
    end: int
    vtype: int
    value: Any = None   # scalars and strings
    etype: int | None = None
    count: int | None = None
    elems_at: list[int] = field(default_factory=list)   # first few string elements' length fields


@dataclass
class TI:
    name: str
    start: int
    ndims_at: int
    dims_at: list[int]
    type_at: int
    offset_at: int
    end: int
    shape: tuple[int, ...]
    ttype: int
    offset: int


@dataclass
class Layout:
    size: int
    n_tensors: int
    n_kv: int
    kvs: list[KV]
    tensors: list[TI]
    header_end: int      # end of the tensor infos
    data_offset: int     # header_end padded to the alignment
    alignment: int
    nbytes: dict[str, int]   # tensor name → bytes of data

    def kv(self, key: str) -> KV:
        return next(k for k in self.kvs if k.key == key)

    def tensor(self, name: str) -> TI:
        return next(t for t in self.tensors if t.name == name)

    def data_end(self, t: TI) -> int:
        return self.data_offset + t.offset + self.nbytes[t.name]


def layout(path: Path) -> Layout:
    """Byte offsets of every header field of a well-formed GGUF (reads the header only)."""
    import gguf

    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = f.read(min(size, 64 << 20))
    pos = 0

    def take(fmt: str) -> Any:
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string() -> str:
        nonlocal pos
        n = take("Q")
        s = buf[pos:pos + n].decode()
        pos += n
        return s

    assert buf[:4] == b"GGUF"
    pos = 8
    n_tensors, n_kv = take("Q"), take("Q")
    kvs = []
    for _ in range(n_kv):
        start = pos
        key = string()
        type_at = pos
        vtype = take("I")
        kv = KV(key, start, type_at, pos, 0, vtype)
        if vtype == STR:
            kv.value = string()
        elif vtype == ARR:
            kv.etype, kv.count = take("I"), take("Q")
            if kv.etype == STR:
                for j in range(kv.count):
                    if j < 8 or j == kv.count // 2:
                        kv.elems_at.append(pos)
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
            else:
                pos += kv.count * _SCALAR_SIZE[kv.etype]
        else:
            code = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q",
                    I64: "q", F64: "d"}[vtype]
            kv.value = take(code)
        kv.end = pos
        kvs.append(kv)
    align = next((k.value for k in kvs if k.key == "general.alignment"), 32)
    tensors, nbytes = [], {}
    for _ in range(n_tensors):
        start = pos
        name = string()
        ndims_at = pos
        nd = take("I")
        dims_at = [pos + 8 * i for i in range(nd)]
        shape = tuple(take("Q") for _ in range(nd))
        type_at = pos
        ttype = take("I")
        offset_at = pos
        offset = take("Q")
        tensors.append(TI(name, start, ndims_at, dims_at, type_at, offset_at, pos, shape, ttype, offset))
        block, per_block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        n = 1
        for d in shape:
            n *= d
        nbytes[name] = n // block * per_block
    header_end = pos
    data_offset = (header_end + align - 1) // align * align
    return Layout(size, n_tensors, n_kv, kvs, tensors, header_end, data_offset, align, nbytes)


# --------------------------------------------------------------------------- mutations

@dataclass(frozen=True)
class Mutation:
    """One mutated file: ``source``'s bytes, truncated to ``truncate``, with
    ``patches`` (offset, bytes) applied, or with ``set_kv`` (key, string) set.

    ``expect``: ``reject`` (the header check must refuse it, with a reason
    matching ``reason``), ``load`` (it must load and generate), or ``any``
    (either, but through a clear error). ``chat``: the model door chats
    instead of completing raw text (for template cases).
    """

    id: str
    family: str
    source: str
    what: str
    truncate: int | None = None
    patches: tuple[tuple[int, bytes], ...] = ()
    set_kv: tuple[str, str] | None = None
    expect: str = "any"
    reason: str = ""
    chat: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patches"] = [[o, b.hex()] for o, b in self.patches]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Mutation:
        d = dict(d)
        d["patches"] = tuple((o, bytes.fromhex(h)) for o, h in d["patches"])
        d["set_kv"] = tuple(d["set_kv"]) if d["set_kv"] else None
        return cls(**d)


def u32(v: int) -> bytes:
    return struct.pack("<I", v % 2**32)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v % 2**64)


TRUNCATED = "past the end|truncated|only \\d+ bytes|implausible (key/value|tensor) count"
HUGE_COUNT = "implausible|past the end"
IN_ORDER = "must follow each other"   # llama.cpp refuses tensors out of order: so does the check


def mutations(lay: Layout, source: str, *, full: bool = True, seed: int = 0) -> list[Mutation]:
    """Deterministic mutations of one file. ``full=False`` gives a subset (a
    big file that is copied once per mutation)."""
    out: list[Mutation] = []
    rng = random.Random(f"{source}:{seed}")

    def add(family: str, what: str, **kw: Any) -> None:
        out.append(Mutation(f"{source}/{family}/{len([m for m in out if m.family == family]):03d}", family,
                            source, what, **kw))

    add("control", "the file as written", expect="load")
    # ---- truncation at every section boundary: header, each KV, each tensor info, padding, data
    last_end = max(lay.data_end(t) for t in lay.tensors)
    cuts: list[tuple[int, str]] = [(0, "empty file"), (3, "inside the magic"), (4, "after the magic"),
                                   (8, "after the version"), (16, "after the tensor count"),
                                   (24, "after the KV count")]
    kvs = lay.kvs if full else [k for k in lay.kvs if k.key in ("general.architecture", "tokenizer.ggml.tokens",
                                                                  "tokenizer.chat_template")]
    for k in kvs:
        cuts += [(k.start, f"before KV {k.key}"), (k.value_at, f"inside KV {k.key} (before its value)")]
        if k.elems_at:
            cuts.append((k.elems_at[-1] + 4, f"inside array {k.key} (mid element)"))
    tis = lay.tensors if full else lay.tensors[:1] + lay.tensors[-1:]
    for t in tis:
        cuts += [(t.start, f"before tensor info {t.name}"), (t.offset_at, f"inside tensor info {t.name}")]
    cuts += [(lay.header_end, "after the tensor infos (before the padding)")]
    if lay.data_offset - lay.header_end > 1:
        cuts.append(((lay.header_end + lay.data_offset) // 2, "inside the alignment padding"))
    cuts.append((lay.data_offset, "at the start of the tensor data"))
    ends = sorted({lay.data_end(t) for t in lay.tensors} - {last_end})
    for e in (ends if full else ends[:1] + ends[len(ends) // 2:len(ends) // 2 + 1]):
        cuts.append((e, "at a tensor's end in the data"))
    cuts.append((last_end - 1, "one byte short of the last tensor's end"))
    seen = set()
    for at, what in cuts:
        if at not in seen and at < lay.size:
            seen.add(at)
            add("truncate", f"cut at byte {at}: {what}", truncate=at, expect="reject", reason=TRUNCATED)
    # ---- magic and version
    for magic in (b"GGUG", b"ggml", b"\0\0\0\0"):
        add("magic", f"magic {magic!r}", patches=((0, magic),), expect="reject", reason="magic")
    for v in (0, 1, 4, 2**31, 2**32 - 1):
        add("version", f"version {v}", patches=((4, u32(v)),), expect="reject", reason="version")
    add("version", "version 2 (older, still valid)", patches=((4, u32(2)),), expect="any")
    # ---- counts
    for what, at, n in (("tensor count", 8, lay.n_tensors), ("KV count", 16, lay.n_kv)):
        for v, label in ((2**64 - 1, "-1"), (2**63, "INT64_MIN"), (2**63 - 1, "INT64_MAX"), (2**32, "2^32"),
                         (2**31, "2^31"), (n + 1, "one more"), (n * 1000, "1000x")):
            add("counts", f"{what} {label}", patches=((at, u64(v)),), expect="reject",
                reason=f"{HUGE_COUNT}|empty or appears twice|dimensions|unknown|not UTF-8|not a power")
        for v, label in ((0, "0"), (n - 1, "one fewer")):
            if full or label == "0":
                add("counts", f"{what} {label}", patches=((at, u64(v)),), expect="any")
    # ---- string lengths (keys, values, vocabulary entries, tensor names)
    fields: list[tuple[str, int, int]] = []   # (label, offset of the u64 length, true length)
    for k in (kvs[:1] + kvs[len(kvs) // 2:len(kvs) // 2 + 1] + kvs[-1:]) if full else kvs[:1]:
        fields.append((f"key length of {k.key}", k.start, len(k.key.encode())))
    for key in ("general.architecture", "general.name", "tokenizer.ggml.model", "tokenizer.chat_template"):
        if any(k.key == key for k in lay.kvs) and (full or key == "tokenizer.chat_template"):
            k = lay.kv(key)
            fields.append((f"value length of {key}", k.value_at, len(k.value.encode())))
    tok = lay.kv("tokenizer.ggml.tokens")
    fields.append(("length of the first token", tok.elems_at[0], None))
    if full:
        fields.append(("length of a middle token", tok.elems_at[-1], None))
        fields.append((f"name length of tensor {lay.tensors[0].name}", lay.tensors[0].start,
                       len(lay.tensors[0].name.encode())))
    fields.append((f"name length of tensor {lay.tensors[-1].name}", lay.tensors[-1].start,
                   len(lay.tensors[-1].name.encode())))
    for label, at, n in fields:
        for v, vl in zip(HUGE64, ("-1", "INT64_MIN", "2^40")):
            add("lengths", f"{label} {vl}", patches=((at, u64(v)),), expect="reject", reason=TRUNCATED)
        if full and n is not None:
            for v, vl in ((0, "0"), (n + 1, "one more"), (n - 1, "one fewer")):
                add("lengths", f"{label} {vl}", patches=((at, u64(v)),), expect="any")
    # ---- array counts
    arrays = [k for k in lay.kvs if k.vtype == ARR and k.key.startswith("tokenizer.ggml.")]
    for k in arrays if full else arrays[:1]:
        for v, vl in zip(HUGE64, ("-1", "INT64_MIN", "2^40")):
            add("arrays", f"{k.key} count {vl}", patches=((k.value_at + 4, u64(v)),), expect="reject",
                reason=TRUNCATED)
        for v, vl in ((0, "0"), (k.count + 1, "one more"), (k.count - 1, "one fewer")):
            if full or vl == "one fewer":
                add("arrays", f"{k.key} count {vl}", patches=((k.value_at + 4, u64(v)),), expect="any")
    # ---- tensor shapes
    t0, tl = lay.tensors[0], lay.tensors[-1]
    for t in (t0, tl) if full else (t0,):
        for v in (0, 5, 2**32 - 1):
            add("shapes", f"{t.name}: {v} dimensions", patches=((t.ndims_at, u32(v)),), expect="reject",
                reason="dimensions")
    for v, vl, reason in ((0, "0", "implausible shape"), (2**63, "2^63", "implausible shape"),
                          (2**64 - 1, "-1", "implausible shape"), (t0.shape[0] * 2, "doubled", "overlap|past the end"),
                          (t0.shape[0] + 32, "+32", "overlap|past the end")):
        add("shapes", f"{t0.name}: first dimension {vl}", patches=((t0.dims_at[0], u64(v)),), expect="reject",
            reason=reason)
    if full:
        add("shapes", f"{tl.name}: last dimension +1", patches=((tl.dims_at[-1], u64(tl.shape[-1] + 1)),),
            expect="reject", reason="past the end")
        add("shapes", f"{t0.name}: dimensions swapped",
            patches=((t0.dims_at[0], u64(t0.shape[-1])), (t0.dims_at[-1], u64(t0.shape[0]))), expect="any")
    # ---- tensor offsets: past the end, misaligned, overlapping
    t1 = lay.tensors[1]
    offs = [(t0, 2**63, "2^63", TRUNCATED), (t0, 2**64 - lay.alignment, "-alignment", TRUNCATED),
            (t0, lay.size, "the file size", TRUNCATED + "|aligned"), (t0, t0.offset + 1, "+1", "aligned"),
            (t0, t1.offset, "the next tensor's", "overlap"), (t1, t0.offset, "the previous tensor's", "overlap"),
            (tl, tl.offset + lay.alignment * 64, "+64 alignments", TRUNCATED)]
    for t, v, vl, reason in offs if full else offs[::2]:
        add("offsets", f"{t.name} offset {vl}", patches=((t.offset_at, u64(v)),), expect="reject", reason=reason)
    same = [(a, b) for a, b in zip(lay.tensors, lay.tensors[1:]) if a.shape == b.shape and a.ttype == b.ttype]
    if same:
        a, b = same[0]
        add("offsets", f"{a.name} and {b.name} offsets swapped (same size)",
            patches=((a.offset_at, u64(b.offset)), (b.offset_at, u64(a.offset))), expect="reject",
            reason=IN_ORDER)
    # ---- unknown types
    name_kv = next(k for k in lay.kvs if k.vtype == STR and k.key != "general.architecture")
    for v in (13, 255, 2**32 - 1):
        add("types", f"{name_kv.key}: value type {v}", patches=((name_kv.type_at, u32(v)),), expect="reject",
            reason="unknown value type")
    for v, reason in ((ARR, "element type 9"), (13, "element type 13"), (2**32 - 1, "element type")):
        if full or v == ARR:
            add("types", f"{tok.key}: element type {v}", patches=((tok.value_at, u32(v)),), expect="reject",
                reason=reason)
    for t in (t0, tl) if full else (t0,):
        for v in (4, 36, 42, 255, 2**32 - 1):   # 4, 36: removed from ggml; 42+: never existed
            if full or v in (4, 2**32 - 1):
                add("types", f"{t.name}: tensor type {v}", patches=((t.type_at, u32(v)),), expect="reject",
                    reason="unknown type")
    for v in (0, 1, 8, 2):   # valid but wrong types: sizes change
        if v != t0.ttype:
            add("types", f"{t0.name}: tensor type {v} (valid, wrong)", patches=((t0.type_at, u32(v)),),
                expect="reject", reason=f"{IN_ORDER}|overlap|past the end|block size")
    # ---- hyperparameters and token ids
    arch = lay.kv("general.architecture")
    hp = [("block_count", (0, 1, 3, 4096, 2**31)), ("embedding_length", (0, 1, 63, 2**20)),
          ("attention.head_count", (0, 3, 2**14)), ("attention.head_count_kv", (0, 3, 7)),
          ("feed_forward_length", (0, 1)), ("context_length", (0, 1, 2**27)),
          ("rope.dimension_count", (0, 1, 2**20)), ("vocab_size", (0, 2**31))]
    for key, values in hp:
        full_key = f"{arch.value}.{key}"
        if not any(k.key == full_key for k in lay.kvs):
            continue
        k = lay.kv(full_key)
        for v in values if full else values[:1]:
            add("hparams", f"{full_key} = {v}", patches=((k.value_at, u32(v)),), expect="any")
    eps = next((k for k in lay.kvs if k.key.endswith("layer_norm_rms_epsilon")), None)
    if eps is not None:
        for v in (float("nan"), -1.0, 0.0, float("inf")) if full else (float("nan"),):
            add("hparams", f"{eps.key} = {v}", patches=((eps.value_at, struct.pack("<f", v)),), expect="any")
    for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
        k = lay.kv(key)
        for v in (2**32 - 1, tok.count, 2**31) if full else (2**32 - 1,):
            add("hparams", f"{key} = {v}", patches=((k.value_at, u32(v)),), expect="any")
    ft = lay.kv("general.file_type")
    add("hparams", "general.file_type = 9999", patches=((ft.value_at, u32(9999)),), expect="any")
    for new in (b"llamx", b"gemma", b"qwen2", b"\xff\xfe\xfd\xfc\xfb", b"lla\0a"):
        if full or new in (b"llamx", b"gemma"):
            add("hparams", f"general.architecture = {new!r}", patches=((arch.value_at + 8, new),), expect="any",
                reason="")
    # ---- random bytes in the header, and in the data (which the check does not read)
    for i in range(40 if full else 8):
        n = rng.randint(1, 8)
        patches = tuple((rng.randrange(24, lay.header_end), bytes([rng.randrange(256)])) for _ in range(n))
        add("random-header", f"{n} random byte(s) in the header, seed {i}", patches=patches, expect="any")
    for i in range(5 if full else 2):
        patches = tuple((rng.randrange(lay.data_offset, lay.size), bytes([rng.randrange(256)])) for _ in range(16))
        add("random-data", f"16 random bytes in the tensor data, seed {i}", patches=patches, expect="load")
    return out


# hostile chat templates: (what, template, expected error) -- refused or bounded in time and size
HOSTILE_TEMPLATES = [
    ("sandbox escape via __class__.__mro__", "{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
    ("sandbox escape via a function's __globals__", "{{ raise_exception.__globals__['os'].system('id') }}",
     "unsafe"),
    ("sandbox escape via cycler.__init__.__globals__", "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
     "unsafe"),
    ("sandbox escape via str.format", "{{ '{0.__class__.__mro__}'.format('') }}", "unsafe"),
    ("mutating the messages list", "{{ messages.append({'role': 'system', 'content': 'x'}) }}", "unsafe"),
    ("endless loop: range(10**9)", "{% for i in range(10**9) %}x{% endfor %}", "too (long|large|big)|range"),
    ("endless loop: nested ranges, no output", "{% for i in range(100000) %}{% for j in range(100000) %}"
     "{% endfor %}{% endfor %}", "too long"),
    ("endless loop: recursive macro", "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
     "too long|recursion|deep"),
    ("huge output: 'x' * 10**10", "{{ 'x' * 10**10 }}", "too (large|big)"),
    ("huge output: doubling with ~ in a loop", "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
     "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "too (large|big)"),
    ("huge output: doubling with + in a loop", "{% set ns = namespace(s='x') %}{% for i in range(64) %}"
     "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}", "too (large|big)"),
    ("huge output: a long loop of long strings", "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
     "too (large|big)"),
    ("huge output: |center(10**10)", "{{ 'x'|center(10**10) }}", "too (large|big)"),
    ("huge output: str.ljust(10**10)", "{{ 'x'.ljust(10**10) }}", "too (large|big)"),
    ("huge output: format width", "{{ '%10000000000s'|format('x') }}", "too (large|big)"),
    ("huge number: 2**100000000", "{{ 2**100000000 }}", "too (large|big)"),
    ("huge output: |indent with a long string", "{{ ('a\\n' * 1000000)|indent('x' * 1000000) }}", "too (large|big)"),
    ("huge output: |replace", "{{ ('x' * 1000000)|replace('x', 'y' * 1000) }}", "too (large|big)"),
    ("huge output: |join with a long separator", "{{ range(100000)|join('x' * 100000) }}", "too (large|big)"),
    ("huge list: [0] * 10**10", "{{ ([0] * 10**10)|length }}", "too (large|big)"),
]


def template_mutations(source: str) -> list[Mutation]:
    out = [Mutation(f"{source}/template/{i:03d}", "template", source, what, set_kv=("tokenizer.chat_template", t),
                    expect="reject-chat", reason=reason, chat=True)
           for i, (what, t, reason) in enumerate(HOSTILE_TEMPLATES)]
    out.append(Mutation(f"{source}/template/{len(out):03d}", "template", source, "a benign template (control)",
                        set_kv=("tokenizer.chat_template",
                                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"),
                        expect="load", chat=True))
    return out


# --------------------------------------------------------------------------- files

def _copy_prefix(src: Path, dst: Path, n: int) -> None:
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        left = n
        while left:
            k = os.sendfile(fo.fileno(), fi.fileno(), n - left, min(left, 1 << 30))
            if not k:
                break
            left -= k


def _with_kv(src: Path, key: str, value: str) -> bytes:
    """``src`` with string KV ``key`` set (replaced or appended), the header re-padded."""
    lay = layout(src)
    blob = src.read_bytes()
    enc = value.encode()
    new = struct.pack("<Q", len(key.encode())) + key.encode() + struct.pack("<IQ", STR, len(enc)) + enc
    old = next((k for k in lay.kvs if k.key == key), None)
    if old is not None:
        head = blob[:old.start] + new + blob[old.end:lay.header_end]
        n_kv = lay.n_kv
    else:
        last = lay.kvs[-1].end
        head = blob[:last] + new + blob[last:lay.header_end]
        n_kv = lay.n_kv + 1
    head = head[:16] + struct.pack("<Q", n_kv) + head[24:]
    head += b"\0" * ((-len(head)) % lay.alignment)
    return head + blob[lay.data_offset:]


def materialize(m: Mutation, src: Path, dst: Path) -> Path:
    """Write mutation ``m`` of ``src`` to ``dst``."""
    if m.set_kv is not None:
        dst.write_bytes(_with_kv(src, *m.set_kv))
    else:
        _copy_prefix(src, dst, src.stat().st_size if m.truncate is None else m.truncate)
    if m.patches:
        with open(dst, "r+b") as f:
            for off, data in m.patches:
                if off + len(data) <= (m.truncate if m.truncate is not None else 1 << 62):
                    f.seek(off)
                    f.write(data)
    return dst


# --------------------------------------------------------------------------- results

def error_of(e: BaseException, path: Path) -> dict[str, Any]:
    from localllm.errors import LocalLLMError

    msg = str(e).replace(str(path), "FILE")
    d = {"outcome": "error", "class": type(e).__name__, "localllm": isinstance(e, LocalLLMError),
         "message": msg[:2000], "names_file": str(path) in str(e)}
    if isinstance(e, LocalLLMError):
        d["hint"] = e.hint
        d["reason"] = getattr(e, "reason", None)
    else:
        import traceback

        d["traceback"] = "".join(traceback.format_exception(e))[-3000:]
    return d


def _stage_check(path: Path) -> dict[str, Any]:
    from localllm import validate
    from localllm.errors import InvalidModelFileError

    try:
        validate.read_header(path)
        return {"outcome": "pass"}
    except InvalidModelFileError as e:
        return {**error_of(e, path), "outcome": "reject"}
    except BaseException as e:  # noqa: BLE001 - anything else is a bug we report
        return error_of(e, path)


def _stage_model(path: Path, chat: bool) -> dict[str, Any]:
    from localllm import Model

    try:
        with Model(path, n_ctx=128, n_threads=1, seed=0) as m:
            if chat:
                text = m.chat([{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
            else:
                text = m.generate("the cat", max_tokens=2, temperature=0)
            return {"outcome": "ok", "text": text, "template": m.info.template_source}
    except BaseException as e:  # noqa: BLE001
        return error_of(e, path)


def _stage_raw(path: Path) -> dict[str, Any]:
    from localllm import runtime

    try:
        runtime.LlamaModel(path).close()
        return {"outcome": "loaded"}
    except BaseException as e:  # noqa: BLE001
        return error_of(e, path)


def _worker(jobs_file: str, start: int, fd: int) -> None:
    import resource

    # a hostile file must not make this process (or llama.cpp in it) take the machine's memory
    resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    spec = json.loads(Path(jobs_file).read_text())
    out = os.fdopen(fd, "w", buffering=1)
    work = Path(spec["workdir"])

    def say(**d: Any) -> None:
        out.write(json.dumps(d) + "\n")
        out.flush()

    for i in range(start, len(spec["jobs"])):
        m = Mutation.from_dict(spec["jobs"][i])
        path = materialize(m, Path(spec["sources"][m.source]), work / f"w{i}.gguf")
        try:
            say(i=i, stage="check", begin=True)
            check = _stage_check(path)
            say(i=i, stage="check", result=check)
            say(i=i, stage="model", begin=True)
            say(i=i, stage="model", result=_stage_model(path, m.chat))
            if check["outcome"] != "pass" and spec.get("raw", True):
                say(i=i, stage="raw", begin=True)
                say(i=i, stage="raw", result=_stage_raw(path))
        finally:
            path.unlink(missing_ok=True)
        say(i=i, done=True)


def run_jobs(jobs: list[Mutation], sources: dict[str, Path], *, raw: bool = True, stall_s: float = 120.0,
             env: dict[str, str] | None = None) -> tuple[list[dict[str, Any]], int]:
    """Run every job through the stages in worker subprocesses.

    Returns (per-job {stage: result}, number of workers started). A stage
    whose worker died gets ``{"outcome": "signal", "signal": N}`` (or
    ``died``/``hang``) and the next worker starts at the following job.
    """
    results: list[dict[str, Any]] = [{} for _ in jobs]
    env = dict(env or os.environ)
    env.pop("LOCALLLM_DEBUG", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    workers = 0
    with tempfile.TemporaryDirectory(prefix="ggufz-") as td:
        jobs_file = Path(td) / "jobs.json"
        jobs_file.write_text(json.dumps({"workdir": td, "sources": {k: str(v) for k, v in sources.items()},
                                         "raw": raw, "jobs": [j.to_dict() for j in jobs]}))
        start = 0
        while start < len(jobs):
            r, w = os.pipe()
            errlog = open(Path(td) / f"stderr-{workers}.txt", "wb")
            proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), str(jobs_file), str(start), str(w)],
                                    pass_fds=(w,), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=errlog, cwd=ROOT, env=env)
            workers += 1
            os.close(w)
            lines: queue.Queue[str | None] = queue.Queue()

            def pump(fd: int = r) -> None:
                with os.fdopen(fd) as f:
                    for line in f:
                        lines.put(line)
                lines.put(None)

            threading.Thread(target=pump, daemon=True).start()
            current: tuple[int, str] | None = None
            last_done = start - 1
            while True:
                try:
                    line = lines.get(timeout=stall_s)
                except queue.Empty:
                    proc.kill()
                    proc.wait()
                    if current:
                        results[current[0]][current[1]] = {"outcome": "hang", "seconds": stall_s}
                    break
                if line is None:
                    break
                d = json.loads(line)
                if d.get("done"):
                    last_done, current = d["i"], None
                elif d.get("begin"):
                    current = (d["i"], d["stage"])
                else:
                    results[d["i"]][d["stage"]] = d["result"]
            rc = proc.wait()
            errlog.close()
            if last_done >= len(jobs) - 1:
                break
            i = current[0] if current else last_done + 1
            if not current:  # died between stages (writing the file): say so rather than skip it
                results[i]["worker"] = {"outcome": "signal" if rc < 0 else "died", "rc": rc}
            elif current[1] not in results[i]:
                results[i][current[1]] = ({"outcome": "signal", "signal": -rc} if rc < 0
                                          else {"outcome": "died", "rc": rc,
                                                "stderr": (Path(td) / f"stderr-{workers - 1}.txt").read_text(
                                                    errors="replace")[-2000:]})
            start = i + 1
    return results, workers


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
