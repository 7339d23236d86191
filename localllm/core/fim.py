"""Fill-in-the-middle (code completion): a prefix and a suffix of code, and other files of the
project, as the token ids a coder model was trained on, built as llama-server's ``/infill``
builds them (``format_prompt_infill`` in tools/server/server-common.cpp), with the model's own
FIM tokens (``tokenizer.ggml.fim_*_token_id``, or found by llama.cpp from their texts).

The prompt, prefix-suffix-middle order (PSM; ``spm=True`` puts the suffix first)::

    [extra files] [BOS] FIM_PRE prefix prompt FIM_SUF suffix FIM_MID

where the extra files are ``FIM_REP "myproject\\n"`` (when the model has FIM_REP), then per file
``FIM_SEP "name\\n" text`` (or a ``--- snippet ---`` line where it has no FIM_SEP), then
``FIM_SEP "filename\\n"``. The prefix keeps its last and the suffix its first tokens: 3:1 of a
window of ``min(2048, n_ctx // 2)`` tokens (llama-server: its batch, 2048); the extra files keep
their last ``n_ctx - window - 2 * max_tokens`` tokens.

Example:
    >>> check_fim({"pre": 1, "suf": 2, "mid": 3, "pad": -1, "rep": -1, "sep": -1})
    >>> check_fim({"pre": -1, "suf": -1, "mid": 3})
    Traceback (most recent call last):
    ...
    localllm.errors.InvalidArgumentError: this model has no fill-in-the-middle tokens (prefix, suffix missing): \
code completion needs a coder model trained for it (Qwen2.5-Coder, CodeLlama, StarCoder2, DeepSeek-Coder, ...)
    >>> extra_files([{"filename": "a.py", "text": "x = 1"}])
    [ExtraFile(text='x = 1', filename='a.py')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from localllm.errors import InvalidArgumentError
from localllm.prompting import Prompter

WINDOW = 2048  # llama-server's n_batch: the prefix and suffix are cut to fit it
_NEEDED = {"pre": "prefix", "suf": "suffix", "mid": "middle"}
# llama-server's separator between extra chunks when the model has no FIM_SEP token
_SNIPPET = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class ExtraFile:
    """Another file of the project, read before the one being completed (``input_extra``)."""

    text: str
    filename: str = "tmp"


def check_fim(fim: Mapping[str, int]) -> None:
    """Refuse a model without the prefix, suffix and middle tokens (a 400 naming them)."""
    missing = [word for name, word in _NEEDED.items() if fim.get(name, -1) < 0]
    if missing:
        raise InvalidArgumentError(
            f"this model has no fill-in-the-middle tokens ({', '.join(missing)} missing): code completion needs "
            "a coder model trained for it (Qwen2.5-Coder, CodeLlama, StarCoder2, DeepSeek-Coder, ...)",
            param="suffix")


def extra_files(value: Any, param: str = "input_extra") -> list[ExtraFile]:
    """``[{"filename": str, "text": str}, ...]`` (llama-server's ``input_extra``) as :class:`ExtraFile` s."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgumentError(f'{param} must be an array of {{"filename": string, "text": string}}',
                                   param=param)
    out = []
    for i, chunk in enumerate(value):
        if isinstance(chunk, ExtraFile):
            out.append(chunk)
            continue
        if not isinstance(chunk, Mapping) or not isinstance(chunk.get("text"), str):
            raise InvalidArgumentError(f'{param}[{i}] must be an object with a "text" string', param=param)
        name = chunk.get("filename", "tmp")
        if not isinstance(name, str):
            raise InvalidArgumentError(f'{param}[{i}].filename must be a string', param=param)
        out.append(ExtraFile(chunk["text"], name))
    return out


def _extra_ids(prompter: Prompter, fim: Mapping[str, int], files: Sequence[ExtraFile]) -> list[int]:
    """The repo-level context before the FIM prefix (https://arxiv.org/pdf/2409.12186)."""
    def tok(text: str) -> list[int]:
        return prompter.tokenize(text, add_special=False, special=False)

    out: list[int] = []
    if fim["rep"] >= 0:
        out += [fim["rep"], *tok("myproject\n")]
    for f in files:
        out += [fim["sep"], *tok(f.filename + "\n")] if fim["sep"] >= 0 else tok(_SNIPPET)
        out += tok(f.text)
    if fim["sep"] >= 0:
        out += [fim["sep"], *tok("filename\n")]
    return out


def infill_ids(prompter: Prompter, prefix: str, suffix: str, *, prompt: str = "",
               extra: Sequence[ExtraFile] = (), n_ctx: int, max_tokens: int | None = None,
               spm: bool = False) -> list[int]:
    """The FIM prompt's token ids (see the module's docstring); ``prompt`` is text the answer
    must start with (read after the prefix, special tokens parsed)."""
    for name, v in (("input_prefix", prefix), ("input_suffix", suffix), ("prompt", prompt)):
        if not isinstance(v, str):
            raise InvalidArgumentError(f"{name} must be a string", param=name)
    model = prompter.model
    fim = model.fim
    check_fim(fim)
    pre = prompter.tokenize(prefix, add_special=False, special=False)
    suf = prompter.tokenize(suffix, add_special=False, special=False)
    said = prompter.tokenize(prompt, add_special=False, special=True) if prompt else []
    extra_ids = _extra_ids(prompter, fim, extra)

    window = min(WINDOW, n_ctx // 2)
    n_pre = min(len(pre), 3 * (window // 4))
    n_suf = min(len(suf), max(0, window // 4 - (2 + len(said))))
    n_extra = min(max(0, n_ctx - window - 2 * (max_tokens or 0)), len(extra_ids))

    head = [fim["pre"], *pre[len(pre) - n_pre:], *said]
    tail = [fim["suf"], *suf[:n_suf]]
    first, second = (tail, head) if spm else (head, tail)
    if model.add_bos:
        first = [model.bos, *first]
    return [*extra_ids[len(extra_ids) - n_extra:], *first, *second, fim["mid"]]
