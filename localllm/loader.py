"""The one loader: a GGUF path → header check → placement → llama.cpp model → prompter.
``Model``, ``serve``, ``plan``, bench and eval all go through it. It takes a *path*: the doors
turn names into paths first (:mod:`localllm.resolve`), so loading never starts a measurement.

``ModelSettings`` holds what every door can say about loading (context,
threads, GPU layers, repacking, mapping, sequences); ``ModelInfo`` describes the
result with the same field names everywhere (``Model.info``, the server's
``/v1/models`` and ``/health``).

Example:
    >>> s = ModelSettings(model="models/smollm2-135m/q8_0/smollm2-135m-q8_0.gguf", n_ctx=2048)
    >>> (s.n_ctx, s.n_gpu_layers, s.n_seq)
    (2048, 'auto', 1)
    >>> loaded = load(s)                                            # doctest: +SKIP
    >>> loaded.info.quant                                           # doctest: +SKIP
    'Q8_0'
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from localllm import settings as settings_mod
from localllm import store
from localllm.errors import InsufficientMemoryError, InvalidArgumentError, ModelNotFoundError
from localllm.formats import KV_TYPES, check_int, check_kv_type

if TYPE_CHECKING:
    from localllm import runtime
    from localllm.plan import Plan
    from localllm.prompting import Prompter
    from localllm.validate import Header

GpuLayers = int | Literal["auto", "all"]


@dataclass(frozen=True)
class ModelSettings:
    """How to load a model. ``n_ctx`` is per sequence; ``n_seq`` sequences are
    decoded together (the server's ``--parallel``), each with its own KV stream."""

    model: str | os.PathLike[str] | None = None   # the GGUF's path (a door resolves names: localllm.resolve)
    n_ctx: int | None = None
    n_threads: int | None = None
    n_gpu_layers: GpuLayers = "auto"
    gpu_memory: int | str | None = None   # caps "auto": bytes or a size like "2GiB" (placement.parse_gpu_memory)
    repack: bool = True
    mmap: bool | None = None    # map the file (True) or read the weights into huge pages (False); None: auto
    n_seq: int = 1
    cache_type_k: str = "f16"   # KV cache element types: f16, bf16, q8_0, q5_1, q5_0, q4_1, q4_0, iq4_nl, f32
    cache_type_v: str = "f16"
    flash_attn: str = "auto"    # auto, on, off
    prompt_cache: bool = True   # KV states of past prompts on disk (localllm/core/prompt_cache.py)
    prompt_cache_dir: str | os.PathLike[str] | None = None   # default: <home>/prompt-cache
    prompt_cache_bytes: int = 1 << 30
    speculate: str = "off"      # prompt lookup drafts for greedy answers: on, off (localllm/core/speculate.py)
    prefill: str = "exact"      # how a prompt shares steps with running streams: exact, fair, fair:K (core/prefill.py)

    def __post_init__(self) -> None:
        from localllm.placement import parse_gpu_layers, parse_gpu_memory

        for name in ("cache_type_k", "cache_type_v"):
            check_kv_type(getattr(self, name), name)
        if self.flash_attn not in ("auto", "on", "off"):
            raise InvalidArgumentError("flash_attn must be auto, on or off", param="flash_attn")
        if self.speculate not in ("on", "off"):
            raise InvalidArgumentError("speculate must be on or off", param="speculate")
        try:
            self.prefill_mode()
        except ValueError as e:
            raise InvalidArgumentError(str(e), param="prefill") from None
        if self.flash_attn == "off" and KV_TYPES[self.cache_type_v].quantized:
            raise InvalidArgumentError("a quantized V cache needs flash attention (flash_attn auto or on)",
                                       param="cache_type_v")
        if self.n_ctx is not None:
            check_int("n_ctx", self.n_ctx, 16)
        if self.n_threads is not None:
            check_int("n_threads", self.n_threads, 1)
        check_int("n_seq", self.n_seq, 1, 256)
        if not isinstance(self.repack, bool):
            raise InvalidArgumentError("repack must be true or false", param="repack")
        if self.mmap is not None and not isinstance(self.mmap, bool):
            raise InvalidArgumentError("mmap must be true, false or None (auto)", param="mmap")
        if not isinstance(self.prompt_cache, bool):
            raise InvalidArgumentError("prompt_cache must be true or false", param="prompt_cache")
        check_int("prompt_cache_bytes", self.prompt_cache_bytes, 1 << 20)
        object.__setattr__(self, "n_gpu_layers", parse_gpu_layers(self.n_gpu_layers))
        object.__setattr__(self, "gpu_memory", parse_gpu_memory(self.gpu_memory))

    def threads(self) -> int:
        return self.n_threads or settings_mod.default_threads()

    def total_context(self, header: Header) -> int:
        """The KV cells of all sequences together: ``n_ctx`` (or the model's default) × ``n_seq``."""
        from localllm.plan import default_context

        return (self.n_ctx or default_context(int(header.get("context_length", 0) or 0))) * self.n_seq

    def plan(self, header: Header, **what_if: Any) -> Plan:
        """The memory plan of loading ``header``'s model with these settings: the one that ``plan``,
        the ``--all-models`` pool and loading itself read (the same layout, mapped or read, for each).
        ``what_if`` passes make_plan's overrides (``ram_available``, ``offload``, ``gpu_free``)."""
        from localllm.plan import make_plan

        return make_plan(header, n_ctx=self.total_context(header), n_seq=self.n_seq, gpu_memory=self.gpu_memory,  # type: ignore[arg-type]
                         cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v, mmap=self.mmap,
                         flash_attn=self.flash_attn_on() is not False, **what_if)

    def use_mmap(self, header: Header) -> bool:
        """Whether the weights are mapped from the file: ``mmap``, or auto (plan.weights_mapped, the one
        rule): where huge pages would not back them in memory, or the model would not fit in RAM so held."""
        if self.mmap is not None:
            return self.mmap
        from localllm import plan

        return plan.weights_mapped(header, self.total_context(header), n_seq=self.n_seq,
                                   cache_type_k=self.cache_type_k, cache_type_v=self.cache_type_v,
                                   flash_attn=self.flash_attn_on() is not False)

    def prefill_mode(self) -> str:
        """``exact`` or ``fair`` (``prefill`` may be ``fair:K``; :func:`localllm.core.prefill.parse`)."""
        from localllm.core.prefill import parse

        return parse(self.prefill)[0]

    def flash_attn_on(self) -> bool | None:
        """llama.cpp's flash attention for these settings: True, False, or None (llama.cpp's auto: on
        where the device has it, so on a CPU). ``prefill="fair"`` turns auto off, unless a quantized V
        cache needs it: llama.cpp's CPU kernel is 3-7× slower per token for the small batches that fair
        feeds once the context is deep (docs/serve.md#fairness)."""
        if self.flash_attn == "auto" and self.prefill_mode() == "fair" and not KV_TYPES[self.cache_type_v].quantized:
            return False
        return {"auto": None, "on": True, "off": False}[self.flash_attn]

    def context_options(self) -> dict[str, Any]:
        """The llama.cpp context options these settings decide (for every generation context)."""
        return {"cache_type_k": self.cache_type_k, "cache_type_v": self.cache_type_v,
                "flash_attn": self.flash_attn_on()}

    def prompt_cache_root(self) -> Path:
        return Path(self.prompt_cache_dir) if self.prompt_cache_dir else settings_mod.home() / "prompt-cache"


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and how it runs (the same fields for every door)."""

    id: str                 # NAME:VERSION in the store, else the file's stem
    path: str
    name: str               # general.name
    arch: str
    parameters: int
    quant: str
    size_bytes: int
    context_train: int
    context: int            # per sequence
    sequences: int          # decoded together
    n_layer: int
    n_embd: int
    n_vocab: int
    bos_token: int          # -1 when the vocabulary has none
    eos_token: int
    add_bos: bool           # whether a raw prompt starts with BOS
    has_chat_template: bool
    template_source: str
    tokenizer_source: str
    gpu_layers: int         # layers llama.cpp was asked to offload (0 on a CPU-only build)
    gpu_layers_requested: int | str
    gpu_memory: int | None  # the cap on "auto" (bytes), None for none
    placement: str          # why that many
    threads: int
    repack: bool
    cache_type_k: str
    cache_type_v: str
    flash_attn: str
    prompt_cache: bool
    speculate: str = "off"  # prompt lookup drafts for greedy answers: on or off
    prefill: str = "exact"  # how a prompt shares steps with running streams: exact, fair or fair:K
    layer_split: str = ""   # which layers are where (plan.layer_split)
    mmap: bool = True       # weights mapped from the file; False: read into memory (huge pages)
    # what clients may ask of it, in Ollama's words ("completion", "tools", "embedding", "insert" (FIM),
    # "thinking"); every model completes text, calls tools (taught by the template or a generic prompt)
    # and embeds (mean pooling)
    capabilities: tuple[str, ...] = ("completion", "tools", "embedding")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Prepared:
    """Everything decided before llama.cpp sees the file."""

    settings: ModelSettings                          # what it was prepared for
    path: Path
    header: Header
    gpu_layers: int
    reason: str
    notes: list[str] = field(default_factory=list)   # e.g. the version chosen for this CPU on first use


@dataclass
class Loaded:
    """A loaded llama.cpp model with its prompter and info. ``close()`` frees it."""

    llama: runtime.LlamaModel
    prompter: Prompter
    info: ModelInfo
    settings: ModelSettings
    path: Path
    notes: list[str] = field(default_factory=list)  # what the caller should tell the user

    def close(self) -> None:
        self.llama.close()


def model_id(path: Path) -> str:
    """``NAME:VERSION`` for a file in the store, else the file's stem."""
    if (path.parent / store.MANIFEST).is_file():
        return f"{path.parent.parent.name}:{path.parent.name}"
    return path.stem


def _path(s: ModelSettings) -> Path:
    if s.model is None or s.model == "":
        raise InvalidArgumentError("no model path given (a door resolves names first: localllm.resolve.resolve)",
                                   param="model")
    p = Path(s.model).expanduser()
    if not p.is_file():
        raise ModelNotFoundError(f"model file {p} does not exist" + (" (a directory)" if p.is_dir() else ""),
                                 hint="pass the path of a .gguf file, or a name at a door (Model, the CLI, serve)",
                                 path=str(p))
    return p


def prepare(s: ModelSettings, notes: list[str] | None = None) -> Prepared:
    """Check the header of ``s.model`` (a path; bounded, before llama.cpp) and place layers.
    Cheap: reads the header only. ``plan`` and ``serve``'s early check stop here; pass the result
    to :func:`load` so it is not done twice. ``notes`` (from resolving) travel with it."""
    from localllm import placement, validate

    path = _path(s)
    header = validate.read_header(path)
    n_ctx = s.n_ctx * s.n_seq if s.n_ctx else None
    gpu_layers, reason = placement.explain(header, s.n_gpu_layers, n_ctx, gpu_memory=s.gpu_memory,  # type: ignore[arg-type]
                                           cache_types=(s.cache_type_k, s.cache_type_v))
    return Prepared(s, path, header, gpu_layers, reason, list(notes or []))


def _check_fits(s: ModelSettings, prep: Prepared) -> None:
    """Refuse, before llama.cpp reads a byte, a model whose plan exceeds this machine's whole RAM:
    mapped, it would load and then read its weights from disk again for every token. (Past the RAM
    *available* only, it is mapped, and the page cache makes room: ``use_mmap``.)"""
    from localllm import hardware
    from localllm.plan import context_size

    if not settings_mod.memory_check():
        return
    context_size(s.n_ctx, int(prep.header.get("context_length", 0) or 0))  # a bad n_ctx is its own error
    p = s.plan(prep.header)
    total = hardware.memory()["total"]
    if p.fits or not total or p.ram_bytes <= total:
        return
    held = "mapped from the file" if p.mmap else "read into memory"
    raise InsufficientMemoryError(
        f"{prep.path}: the model needs {p.ram_bytes / 2**30:.1f} GiB of RAM ({held}, context "
        f"{p.n_ctx} tokens) but this machine has {total / 2**30:.1f} GiB in all",
        hint="; ".join(r for r in p.reasons if r.startswith(("a context of", "smaller quants", "no quant")))
        + " (localllm plan MODEL; LOCALLLM_MEMORY_CHECK=0 loads it anyway)", path=str(prep.path))


def load(s: ModelSettings, progress: Callable[[str], None] | None = None,
         prepared: Prepared | None = None) -> Loaded:
    """Load ``s.model`` (a path): header, placement, llama.cpp, prompter. ``prepared``: the result of
    :func:`prepare` for these same settings, so nothing is read twice.

    Runs out of GPU memory → retries with fewer layers (a note says so).
    """
    from localllm import hardware, placement, runtime
    from localllm.plan import context_size, layer_split
    from localllm.prompting import Prompter

    if prepared is not None and prepared.settings != s:
        raise ValueError("load(): `prepared` was made for other settings")  # a bug in the caller, not the user's
    prep = prepared or prepare(s)
    if progress:
        progress(f"loading {prep.path}")
    offload = runtime.supports_gpu_offload()
    reason = prep.reason
    if not offload and isinstance(s.n_gpu_layers, int) and s.n_gpu_layers > 0:
        reason = (f"{s.n_gpu_layers} GPU layers requested, but this llama.cpp build has no GPU offload "
                  "(CPU only): 0 layers")
    _check_fits(s, prep)
    mmap = s.use_mmap(prep.header)
    if mmap and s.mmap is None and hardware.weights_in_memory():
        prep.notes.append("the weights are mapped from the file, not read into huge pages: held in memory, "
                          "the model would not fit in the RAM available (localllm plan MODEL --no-mmap says "
                          "how much it needs)")
    llama, gpu_layers, notes = placement.load_with_fallback(
        lambda n: runtime.LlamaModel(prep.path, n_gpu_layers=n, use_extra_bufts=s.repack, use_mmap=mmap),
        prep.gpu_layers,
        n_layer=int(prep.header.get("block_count", 0)) if prep.gpu_layers else None)
    if not offload:
        if s.n_gpu_layers not in (0, "auto"):
            notes.append(reason)
        gpu_layers = 0
    try:
        n_ctx = context_size(s.n_ctx, llama.n_ctx_train)
        prompter = Prompter(llama, prep.header.metadata)
        meta = llama.meta()
    except BaseException:
        llama.close()
        raise
    info = ModelInfo(
        id=model_id(prep.path), path=str(prep.path), name=meta.get("general.name", prep.path.stem),
        arch=meta.get("general.architecture", "?"), parameters=llama.n_params, quant=prep.header.quant,
        size_bytes=llama.size, context_train=llama.n_ctx_train, context=n_ctx, sequences=s.n_seq,
        n_layer=llama.n_layer, n_embd=llama.n_embd, n_vocab=llama.n_vocab, bos_token=llama.bos,
        eos_token=llama.eos, add_bos=llama.add_bos,
        has_chat_template=prompter.template_source == "gguf", template_source=prompter.template_source,
        tokenizer_source=prompter.tokenizer_source, gpu_layers=min(gpu_layers, llama.n_layer + 1),
        gpu_layers_requested=s.n_gpu_layers, gpu_memory=s.gpu_memory, placement=notes[-1] if notes else reason, threads=s.threads(),
        repack=s.repack, cache_type_k=s.cache_type_k, cache_type_v=s.cache_type_v,
        flash_attn={None: "auto", True: "on", False: "off"}[s.flash_attn_on()],
        prompt_cache=s.prompt_cache, speculate=s.speculate, prefill=s.prefill,
        layer_split=layer_split(llama.n_layer, min(gpu_layers, llama.n_layer + 1)), mmap=mmap,
        capabilities=capabilities(llama, prompter.template))
    return Loaded(llama=llama, prompter=prompter, info=info, settings=s, path=prep.path, notes=prep.notes + notes)


def capabilities(llama: Any, template: str | None) -> tuple[str, ...]:
    """What a model can be asked (ModelInfo.capabilities): a reranker only ranks; any other model
    completes, chats with tools and embeds, fills in the middle where its vocabulary has the tokens,
    and thinks where its chat template has reasoning markers."""
    from localllm.core import reasoning

    if llama.is_reranker:
        return ("rerank",)
    fim = ("insert",) if all(llama.fim[k] >= 0 for k in ("pre", "suf", "mid")) else ()
    thinking = ("thinking",) if reasoning.detect(template) is not None else ()
    return ("completion", "tools", "embedding", *fim, *thinking)


__all__ = ["ModelSettings", "ModelInfo", "Loaded", "Prepared", "prepare", "load", "model_id"]
