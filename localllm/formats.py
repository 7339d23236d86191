"""The one table of weight types (quants), KV cache types and byte sizes that every layer shares.

Pure data and parsing, no imports beyond :mod:`localllm.errors`: the CLI reads these tables to
build its choices without loading gguf, numpy or llama.cpp. The numbers are llama.cpp's
(``llama_ftype`` in include/llama.h, ``ggml_type`` in ggml.h); tests/checks compare them with the
gguf package's enums.

Example:
    >>> QUANTS["Q4_K_M"].ftype, KV_TYPES["q8_0"].ggml_type
    (15, 8)
    >>> parse_quant("q8_0"), parse_size("512MB"), parse_size("512MiB")
    ('Q8_0', 512000000, 536870912)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from localllm.errors import InvalidArgumentError


@dataclass(frozen=True)
class Quant:
    """A weight type a GGUF can be converted or requantized to."""

    name: str
    ftype: int          # llama.cpp's llama_ftype (general.file_type)
    bpw: float          # approximate bits per weight, for "another quant would fit"
    written: bool       # the converter writes it itself; else llama.cpp quantizes an intermediate
    convert: bool       # offered by `localllm convert --quant`


QUANTS: dict[str, Quant] = {q.name: q for q in (
    Quant("F32", 0, 32.0, True, True),
    Quant("F16", 1, 16.0, True, True),
    Quant("BF16", 32, 16.0, True, True),
    Quant("Q8_0", 7, 8.5, True, True),
    Quant("Q6_K", 18, 6.56, False, True),
    Quant("Q5_K_M", 17, 5.69, False, True),
    Quant("Q5_1", 9, 6.0, False, True),
    Quant("Q5_0", 8, 5.5, False, True),
    Quant("Q4_K_M", 15, 4.89, False, True),
    Quant("Q4_1", 3, 5.0, False, True),
    Quant("Q4_0", 2, 4.55, False, True),
    Quant("IQ4_XS", 30, 4.25, False, False),
    Quant("Q3_K_M", 12, 3.91, False, False),
    Quant("Q2_K", 10, 3.35, False, False),
)}
CONVERT_QUANTS = tuple(q for q, v in QUANTS.items() if v.convert)   # `convert --quant`'s choices
# Q4_K_M: the usual CPU choice. CPU decoding is memory-bandwidth bound, so ~4.8
# bits/weight runs ~3x faster than F16, and K-quants keep quality close to Q5/Q6.
DEFAULT_QUANT = "Q4_K_M"


def parse_quant(name: str, choices: tuple[str, ...] = CONVERT_QUANTS) -> str:
    """Normalise a ``--quant`` value (case-insensitive) to one of ``choices``.

    Example:
        >>> parse_quant("q4_k_m")
        'Q4_K_M'
    """
    q = str(name).strip().upper()
    if q not in choices:
        raise InvalidArgumentError(f"unknown quant type {name!r}; choose one of {', '.join(choices)}",
                                   param="quant")
    return q


@dataclass(frozen=True)
class KVType:
    """An element type of the KV cache."""

    name: str
    ggml_type: int       # ggml_type id llama.cpp's context takes (type_k, type_v)
    bytes: float         # bytes per element (a quantized block's bytes / 32)
    quantized: bool      # a quantized V cache needs flash attention


KV_TYPES: dict[str, KVType] = {k.name: k for k in (
    KVType("f32", 0, 4.0, False),
    KVType("f16", 1, 2.0, False),
    KVType("bf16", 30, 2.0, False),
    KVType("q8_0", 8, 34 / 32, True),
    KVType("q4_0", 2, 18 / 32, True),
    KVType("q4_1", 3, 20 / 32, True),
    KVType("q5_0", 6, 22 / 32, True),
    KVType("q5_1", 7, 24 / 32, True),
    KVType("iq4_nl", 20, 18 / 32, True),
)}
CACHE_TYPES = tuple(KV_TYPES)   # the KV cache types localllm offers


def check_kv_type(value: str, param: str) -> str:
    """``value`` if it names a KV cache type, else InvalidArgumentError naming ``param``."""
    if value not in KV_TYPES:
        raise InvalidArgumentError(f"{param} must be one of {', '.join(CACHE_TYPES)}", param=param)
    return value


# decimal units are powers of 1000 and binary ones of 1024 (as IEC 80000-13, Kubernetes and llama.cpp's
# own logs write them); a bare letter (2g, 512m) is binary, as in `ulimit` and Docker
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
               "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_size(value: str | int, param: str = "size") -> int:
    """Bytes from ``value``: an integer, or a number with a unit (``512MB`` = 512·10⁶,
    ``512MiB`` = ``512M`` = 512·2²⁰, ``2GiB``, ``1.5g``). The one size parser of every door.

    Example:
        >>> parse_size("2GiB"), parse_size("2GB"), parse_size("6g"), parse_size(1024)
        (2147483648, 2000000000, 6442450944, 1024)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 0:
            return value
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise InvalidArgumentError(f"{param.replace('_', ' ')} must be a size like 2GiB, 512MB or a number of bytes >= 0, "
                               f"not {value!r}", param=param)


def check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    """``value`` if it is an integer (not a bool) in [lo, hi], else InvalidArgumentError naming ``name``.

    Example:
        >>> check_int("n_ctx", 2048, 16)
        2048
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        raise InvalidArgumentError(f"{name} must be an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""),
                                   param=name)
    return value


__all__ = ["Quant", "QUANTS", "CONVERT_QUANTS", "DEFAULT_QUANT", "parse_quant", "KVType", "KV_TYPES", "CACHE_TYPES",
           "check_kv_type", "parse_size", "check_int"]
