"""The prompt cache on disk: a sequence's KV state, saved after a request and
restored by the next request (or the next process) that starts with the same
tokens, so a fixed system prompt is decoded once per machine.

One file per entry, in ``<home>/prompt-cache/<key>/``. The key names what
makes a KV state valid: the model file's sha256 (from the store's manifest,
else its quick hash), the llama.cpp version, the KV cache types, flash
attention and the number of KV streams (llama.cpp's state format depends on
all of them). A file holds a header (its key, its tokens, the length and
sha256 of the state) and the state as llama.cpp wrote it. A file is used only
after every check passes: magic, key, length, checksum, and finally
llama.cpp's own reading of it; anything else is refused, deleted, and the
prompt decoded from scratch (its fresh state then replaces the file).

An entry is a prompt's canonical chunks (see :mod:`localllm.core.lanes`),
saved when the last of them is decoded: its state is bit for bit what any
prompt starting with those tokens decodes, so a restored prefix never changes
an answer. A prompt reuses the longest common prefix of any entry, up to its
last cut within it: conversations that share a system prompt and tool
definitions share that part; the next turn of a chat reuses the previous
turns up to the last finished one. An entry that is a prefix of a newer one
is dropped; beyond the size cap the least recently used entries go.

Example:
    >>> pc = PromptCache(Path("/tmp/pc"), {"model": "abc"}, max_bytes=1 << 20)
    >>> pc.lookup([1, 2, 3], have=0) is None
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("localllm.prompt_cache")

MAGIC = b"LLPCACHE2\n"  # 2: states of canonical chunks only (1 held states decoded in any pieces)
MIN_TOKENS = 64        # shorter sequences cost less to decode than to save
MIN_GAIN = 16          # restore only when the disk has this many more tokens than the slot
DEFAULT_MAX_BYTES = 1 << 30


@dataclass
class Entry:
    path: Path
    tokens: list[int]
    size: int
    used: float


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists (slice compares run in C)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:  # largest n with a[:n] == b[:n]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _key_dir(root: Path, key: dict[str, Any]) -> tuple[str, Path]:
    text = json.dumps(key, sort_keys=True)
    return text, root / hashlib.sha256(text.encode()).hexdigest()[:24]


class PromptCache:
    """Entries for one key (one model and KV layout) under ``root``."""

    def __init__(self, root: Path, key: dict[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.key_text, self.dir = _key_dir(Path(root), key)
        self.max_bytes = max_bytes
        self._entries: dict[str, Entry] | None = None  # read on first use
        self._lock = threading.RLock()  # the index: the scheduler's thread and the writers share it
        self._writers: list[threading.Thread] = []
        self.stats = {"hits": 0, "misses": 0, "saved": 0, "refused": 0, "evicted": 0}

    # ------------------------------------------------------------------ the index
    def _index(self) -> dict[str, Entry]:
        with self._lock:
            return self._read_index()

    def _read_index(self) -> dict[str, Entry]:
        if self._entries is None:
            self._entries = {}
            for p in sorted(self.dir.glob("*.kv")) if self.dir.is_dir() else []:
                head = self._read_header(p)
                if head is None:
                    self._refuse(p, "unreadable header")
                    continue
                st = p.stat()
                self._entries[p.name] = Entry(p, head["tokens"], st.st_size, st.st_mtime)
        return self._entries

    def _read_header(self, p: Path) -> dict[str, Any] | None:
        try:
            with open(p, "rb") as f:
                if f.read(len(MAGIC)) != MAGIC:
                    return None
                (n,) = struct.unpack("<I", f.read(4))
                head = json.loads(f.read(n))
        except (OSError, ValueError, struct.error):
            return None
        if (not isinstance(head, dict) or head.get("key") != self.key_text
                or not isinstance(head.get("tokens"), list) or not isinstance(head.get("length"), int)):
            return None
        head["offset"] = len(MAGIC) + 4 + n
        return head

    def _refuse(self, p: Path, why: str) -> None:
        log.warning("prompt cache: refusing %s (%s); it will be rebuilt", p.name, why)
        self.stats["refused"] += 1
        self._drop(p)

    def _drop(self, p: Path) -> None:
        with self._lock:
            if self._entries is not None:
                self._entries.pop(p.name, None)
        try:
            p.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------ restore
    def lookup(self, prompt: list[int], *, have: int) -> Entry | None:
        """The entry sharing the longest prefix with ``prompt`` (short of its last token),
        when that is at least MIN_GAIN tokens more than the ``have`` already in memory."""
        want = prompt[:-1]
        best, best_n = None, have + MIN_GAIN - 1
        for e in list(self._index().values()):
            if min(len(e.tokens), len(want)) <= best_n or e.tokens[:best_n + 1] != want[:best_n + 1]:
                continue
            n = common_prefix(e.tokens, want)
            if n > best_n:
                best, best_n = e, n
        if best is None:
            self.stats["misses"] += 1
        return best

    def load(self, e: Entry) -> bytearray | None:
        """The state bytes of ``e``, checked against its header; None (and the file gone) if any check fails."""
        head = self._read_header(e.path)
        if head is None or head["tokens"] != e.tokens:
            self._refuse(e.path, "header does not match this model or its index entry")
            return None
        if head["length"] != e.path.stat().st_size - head["offset"]:  # before allocating what it claims
            self._refuse(e.path, "truncated or damaged")
            return None
        blob = bytearray(head["length"])
        try:
            with open(e.path, "rb") as f:
                f.seek(head["offset"])
                got = f.readinto(blob)
                extra = f.read(1)
        except OSError as err:
            self._refuse(e.path, f"unreadable: {err}")
            return None
        if got != len(blob) or extra or hashlib.sha256(blob).hexdigest() != head.get("sha256"):
            self._refuse(e.path, "truncated or damaged")
            return None
        e.used = time.time()
        try:
            os.utime(e.path)
        except OSError:
            pass
        self.stats["hits"] += 1
        return blob

    def refuse(self, e: Entry, why: str) -> None:
        """llama.cpp would not read ``e``'s state: delete it."""
        self._refuse(e.path, why)

    # ------------------------------------------------------------------ save
    def wants(self, tokens: list[int]) -> bool:
        """Whether saving ``tokens`` pays: at least MIN_TOKENS, and a quarter of them on no file yet
        (a chat's every turn would rewrite the whole conversation; a restart then decodes at most that quarter)."""
        if len(tokens) < MIN_TOKENS:
            return False
        covered = max((common_prefix(e.tokens, tokens) for e in list(self._index().values())), default=0)
        return len(tokens) - covered >= max(MIN_TOKENS, len(tokens) // 4)

    def save_later(self, tokens: list[int], blob: bytes) -> None:
        """:meth:`save` on a thread of its own (the checksum and the write stay off the decode loop)."""
        self._writers = [t for t in self._writers if t.is_alive()]
        t = threading.Thread(target=self.save, args=(tokens, blob), name="localllm-prompt-cache", daemon=True)
        self._writers.append(t)
        t.start()

    def flush(self) -> None:
        """Wait for the writes in progress."""
        for t in self._writers:
            t.join()
        self._writers = []

    def save(self, tokens: list[int], blob: bytes) -> Path | None:
        """Store ``blob`` as the state of ``tokens``; drop entries it covers; evict beyond the cap."""
        if len(tokens) < MIN_TOKENS or not blob or len(blob) > self.max_bytes:
            return None
        head = json.dumps({"key": self.key_text, "tokens": tokens, "length": len(blob),
                           "sha256": hashlib.sha256(blob).hexdigest()}).encode()
        name = hashlib.sha256(self.key_text.encode() + struct.pack(f"<{len(tokens)}i", *tokens)).hexdigest()[:32]
        path = self.dir / f"{name}.kv"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.dir)
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + struct.pack("<I", len(head)) + head)
                f.write(blob)
            os.replace(tmp, path)  # readers see a whole file or none
        except OSError as err:
            log.warning("prompt cache: could not save an entry (%s)", err)
            return None
        with self._lock:
            index = self._read_index()
            for e in list(index.values()):  # covered: the new entry restores all of it
                if len(e.tokens) < len(tokens) and tokens[:len(e.tokens)] == e.tokens:
                    self._drop(e.path)
            index[path.name] = Entry(path, list(tokens), path.stat().st_size, time.time())
            self.stats["saved"] += 1
            self._evict()
        return path

    def _evict(self) -> None:
        index = self._index()
        total = sum(e.size for e in index.values())
        for e in sorted(index.values(), key=lambda e: e.used):
            if total <= self.max_bytes:
                break
            total -= e.size
            self._drop(e.path)
            self.stats["evicted"] += 1

    def size_bytes(self) -> int:
        return sum(e.size for e in self._index().values())


def model_digest(path: Path) -> str:
    """The model file's sha256 from its store manifest (checked when it was stored), else its quick hash."""
    from localllm import store

    m = store.read_manifest(path.parent)
    try:
        if m.get("file") == path.name and m.get("size") == path.stat().st_size and m.get("sha256"):
            return f"sha256:{m['sha256']}"
    except OSError:
        pass
    return f"quick:{store.quick_hash(path)}"


def open_cache(root: Path, model_path: Path, *, n_stream: int, chunk: int, context: dict[str, Any],
               max_bytes: int = DEFAULT_MAX_BYTES) -> PromptCache:
    """The cache for this model file, KV layout (``context``: ModelSettings.context_options())
    and canonical chunk length (the numbers in a state depend on how it was cut)."""
    from localllm import runtime
    from localllm.core.lanes import MIN_CHUNK

    key = {"model": model_digest(Path(model_path)), "llama_cpp": runtime.llama_cpp_version(),
           "n_stream": n_stream, "chunks": f"{chunk}/{MIN_CHUNK}",
           **{k: context.get(k) for k in ("cache_type_k", "cache_type_v", "flash_attn")}}
    return PromptCache(root, key, max_bytes=max_bytes)
