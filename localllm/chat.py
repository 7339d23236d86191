"""Chat templates: a GGUF's own Jinja2 template, rendered in a sandbox.

A chat template comes from the model file, so it is untrusted input: it is
rendered in Jinja2's ``ImmutableSandboxedEnvironment`` (no attribute access
to Python internals, no mutation of our objects), with the same options
Hugging Face uses (``trim_blocks``, ``lstrip_blocks``, loop controls).

Example:
    >>> render_chat(CHATML, [{"role": "user", "content": "Hi"}])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from localllm.errors import InvalidArgumentError, TemplateError

# Used only when a GGUF has no template of its own (Model.info says so).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Templates for GGUFs that ship none, chosen by the special tokens the
# vocabulary really has (a wrong template gives gibberish or endless output).
GEMMA = (
    "{{ bos_token }}{% set ns = namespace(sys='') %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% set ns.sys = m['content'] + '\n\n' %}"
    "{% else %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if m['role'] != 'assistant' %}{{ ns.sys }}{% set ns.sys = '' %}{% endif %}"
    "{{ m['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] | trim) + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
FALLBACKS: tuple[tuple[str, str, str], ...] = (
    ("<start_of_turn>", "gemma", GEMMA),
    ("<|im_start|>", "chatml", CHATML),
    ("<|start_header_id|>", "llama3", LLAMA3),
)


def guess_template(is_special_token: Callable[[str], bool]) -> tuple[str, str]:
    """(name, template) for a model without one, from the special tokens it has;
    ChatML when nothing matches."""
    for marker, name, template in FALLBACKS:
        if is_special_token(marker):
            return name, template
    return "chatml", CHATML


ROLES = ("system", "user", "assistant", "tool", "developer")


def _raise(message: str) -> None:
    raise TemplateError(f"the chat template refused the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    # HF templates call |tojson with these arguments
    env.policies["json.dumps_kwargs"] = {"ensure_ascii": False, "sort_keys": False}
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the model's chat template does not parse: {e}") from None


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a messages list (OpenAI shape) and flatten text-part contents.

    Raises InvalidArgumentError naming the bad field.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidArgumentError("messages must be a non-empty list of {role, content} objects",
                                   param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidArgumentError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidArgumentError(f"messages[{i}].role must be one of {', '.join(ROLES)}",
                                       param=f"messages[{i}].role")
        content = m.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidArgumentError(f"messages[{i}].content: only text parts are supported",
                                               param=f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise InvalidArgumentError(f"messages[{i}].content must be a string",
                                       param=f"messages[{i}].content")
        msg = dict(m)
        msg["content"] = content
        out.append(msg)
    return out


def render_chat(template: str, messages: Any, *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, **extra: Any) -> str:
    """Render ``messages`` with ``template`` in the sandbox."""
    msgs = normalize_messages(messages)
    tmpl = _compile(template)
    try:
        return tmpl.render(messages=msgs, bos_token=bos_token, eos_token=eos_token,
                           add_generation_prompt=add_generation_prompt, **extra)
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the model's chat template tried an unsafe operation: {e}") from None
    except Exception as e:  # a template is a program; any failure is the template's
        raise TemplateError(f"the model's chat template failed: {e}") from None
