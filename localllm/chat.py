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

import contextvars
import ctypes
import datetime
import functools
import re
import threading
from collections.abc import Callable, Mapping, Sequence, Sized
from typing import Any

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.nodes import EvalContext
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


# ---------------------------------------------------------------- bounds
# A template is a program from the model file: the sandbox stops it reaching
# Python's internals, these bounds stop it taking the machine's time and memory.
RENDER_TIMEOUT_S = 5.0          # a real template renders in milliseconds
SIZE_LIMIT = 4 << 20            # characters or items of any value, and of the output ...
SIZE_PER_INPUT_CHAR = 4         # ... plus this many per character of the conversation
_MAX_INT_BITS = 1 << 16
_limit: contextvars.ContextVar[int] = contextvars.ContextVar("template_size_limit", default=SIZE_LIMIT)


def _too_large(what: str) -> TemplateError:
    return TemplateError(f"the model's chat template makes a value too large ({what}; "
                         f"limit {_limit.get()} characters or items)")


def _size(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple, dict)) else 0


def _check_format(spec: Any) -> None:
    """A width or precision in a format string ('%9999999999s', '{:>9999999999}') is an allocation."""
    if isinstance(spec, str) and any(len(d) > 9 or int(d) > _limit.get() for d in re.findall(r"\d+", spec)):
        raise _too_large("a format width")


def _check_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _limit.get():
            raise _too_large(f"an argument of {a.bit_length()} bits")


def _check_result(v: Any) -> Any:
    if _size(v) > _limit.get():
        raise _too_large(f"a value of {_size(v)}")
    return v


def _estimate(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse a call (a filter, a global or a str method) whose result would be too large, before it is made."""
    _check_args(args, kwargs)
    name = getattr(fn, "__name__", "")
    owner = getattr(fn, "__self__", None)
    a = [x for x in args if not isinstance(x, EvalContext)]
    if isinstance(owner, str):  # a str method: the string is its first argument
        a = [owner, *a]
    limit = _limit.get()
    if name.endswith("format") or name == "format_map":
        _check_format(a[0] if a else None)
    elif name.endswith("replace") and len(a) >= 3 and all(isinstance(x, str) for x in a[:3]):
        s, old, new = a[:3]
        if len(s) + (s.count(old) if old else len(s) + 1) * len(new) > limit:
            raise _too_large("a replace")
    elif name.endswith("join") and a:
        seq, sep = (a[1] if len(a) > 1 else None, a[0]) if isinstance(owner, str) else \
            (a[0], a[1] if len(a) > 1 else kwargs.get("d", ""))
        if isinstance(seq, Sized) and isinstance(sep, str) and len(seq) * len(sep) > limit:
            raise _too_large("a join")
    elif name.endswith("indent") and a and isinstance(a[0], str):
        width = a[1] if len(a) > 1 else kwargs.get("width")
        if isinstance(width, str) and len(width) * (a[0].count("\n") + 1) > limit:
            raise _too_large("an indent")


def _guard_filter(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _estimate(fn, args, kwargs)
        return _check_result(fn(*args, **kwargs))
    return guarded


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node: Any, frame: Any) -> None:  # the ~ operator: joined with a size check
        self.write("environment.bounded_join((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset(["*", "**", "+", "%", "<<"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        ints = all(isinstance(x, int) for x in (left, right))
        if operator == "*":
            if ints and left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise _too_large("a product")
            n, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(n, int) and _size(seq) * max(n, 0) > _limit.get():
                raise _too_large(f"a repetition {n} times")
        elif operator == "**" and ints and right > 0 and abs(left) > 1 and \
                left.bit_length() * right > _MAX_INT_BITS:
            raise _too_large("a power")
        elif operator == "<<" and ints and right > _MAX_INT_BITS:
            raise _too_large("a shift")
        elif operator == "+" and _size(left) + _size(right) > _limit.get():
            raise _too_large("a concatenation")
        elif operator == "%":
            _check_format(left)
        return _check_result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _estimate(__obj, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def bounded_join(self, parts: tuple[Any, ...]) -> str:
        strs = [str(p) for p in parts]
        if sum(map(len, strs)) > _limit.get():
            raise _too_large("a concatenation")
        return "".join(strs)


class _RenderTimeout(BaseException):
    """Raised asynchronously in the rendering thread (BaseException: no template code catches it)."""


class _Deadline:
    """Interrupt the current thread's Python code after ``seconds`` (a template loop is Python code)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.tid, self.lock, self.active, self.fired = seconds, threading.get_ident(), \
            threading.Lock(), True, False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def _fire(self) -> None:
        with self.lock:
            if self.active:
                self.fired = True
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid), ctypes.py_object(_RenderTimeout))

    def __enter__(self) -> _Deadline:
        self.timer.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            self.active = False
            if self.fired:  # not raised yet (it may arrive late): withdraw it
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.tid), None)
        self.timer.cancel()


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters = {k: _guard_filter(f) for k, f in env.filters.items()}
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
    limit = SIZE_LIMIT + SIZE_PER_INPUT_CHAR * sum(len(m["content"]) for m in msgs)
    token = _limit.set(limit)
    try:
        out: list[str] = []
        n = 0
        with _Deadline(RENDER_TIMEOUT_S):
            for piece in tmpl.generate(messages=msgs, bos_token=bos_token, eos_token=eos_token,
                                       add_generation_prompt=add_generation_prompt, **extra):
                n += len(piece)
                if n > limit:
                    raise TemplateError(f"the model's chat template output is too large (over {limit} characters)")
                out.append(piece)
        return "".join(out)
    except _RenderTimeout:
        raise TemplateError(f"the model's chat template took too long (over {RENDER_TIMEOUT_S:g} s)") from None
    except TemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise TemplateError(f"the model's chat template tried an unsafe operation: {e}") from None
    except RecursionError:  # Python's own wording names wherever the stack ran out, which varies run to run
        raise TemplateError("the model's chat template failed: endless recursion") from None
    except Exception as e:  # a template is a program; any failure is the template's
        raise TemplateError(f"the model's chat template failed: {str(e)[:200]}") from None
    finally:
        _limit.reset(token)
