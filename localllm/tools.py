"""Tool calling: the request's tools, the prompt, the grammar, and parsing the answer.

The model's own chat template renders the tools (``tools`` as the Jinja
templates of Qwen2.5, Llama-3.x, Mistral and Hermes expect them). The call
syntax is chosen from the template, one parser per family:

- ``hermes`` (Qwen2.5, Hermes 2/3): ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``
- ``llama3`` (Llama 3.1–3.3): a JSON object ``{"name": …, "parameters": {…}}``, maybe after ``<|python_tag|>``
- ``mistral`` (Nemo): ``[TOOL_CALLS][{"name": …, "arguments": {…}}]``
- ``mistral-args`` (Small 3.2, Devstral): ``[TOOL_CALLS]name[CALL_ID]id[ARGS]{…}``
- ``generic``: a template that knows no tools; the tools are described in a
  system message and the model is asked for the hermes syntax.

``tool_choice`` ``required`` or a named function constrains generation with a
grammar built from the tools' JSON schemas, so the call always parses and
validates. With ``auto``, an answer that does not parse as a call is returned
as plain content with the reason; the model's text is never dropped.

Example:
    >>> spec = spec_from([{"type": "function", "function": {"name": "add", "parameters": {
    ...     "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}])
    >>> p = parse('<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>', spec, "hermes")
    >>> (p.calls[0]["function"]["name"], p.calls[0]["function"]["arguments"], p.content)
    ('add', '{"a": 2}', None)
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from localllm.errors import InvalidArgumentError

MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolSpec:
    """What a request asks for: its tools, ``choice`` (auto, none, required, or a
    function's name with ``named``), and whether several calls may come at once."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def by_name(self, name: str) -> Tool | None:
        return next((t for t in self.tools if t.name == name), None)


def _bad(param: str, msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} {msg}", param=param)


def _tool(i: int, t: Any) -> Tool:
    p = f"tools[{i}]"
    if not isinstance(t, Mapping) or t.get("type", "function") != "function" or not isinstance(t.get("function"), Mapping):
        raise _bad(p, 'must be {"type": "function", "function": {"name": ..., "parameters": {...}}}')
    f = t["function"]
    name = f.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
        raise _bad(f"{p}.function.name", "must be 1-64 letters, digits, _ . or -")
    params = f.get("parameters", {"type": "object", "properties": {}})
    if not isinstance(params, Mapping):
        raise _bad(f"{p}.function.parameters", "must be a JSON schema object")
    desc = f.get("description", "")
    if not isinstance(desc, str):
        raise _bad(f"{p}.function.description", "must be a string")
    return Tool(name, desc, dict(params))


def spec_from(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolSpec | None:
    """Check the OpenAI ``tools``/``tool_choice``/``parallel_tool_calls`` fields (None: no tools)."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "needs tools")
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not 0 < len(tools) <= MAX_TOOLS:
        raise _bad("tools", f"must be a list of 1 to {MAX_TOOLS} tools")
    ts = tuple(_tool(i, t) for i, t in enumerate(tools))
    if len({t.name for t in ts}) != len(ts):
        raise _bad("tools", "has two tools with the same name")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls", "must be true or false")
    # one call per answer unless asked (as llama-server): a small model given the choice repeats its call
    parallel = parallel_tool_calls is True
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolSpec(ts, tool_choice or "auto", None, parallel)
    if isinstance(tool_choice, Mapping) and isinstance(tool_choice.get("function"), Mapping):
        name = tool_choice["function"].get("name")
        if not any(t.name == name for t in ts):
            raise _bad("tool_choice", f"names a function that is not in tools: {name!r}")
        return ToolSpec(ts, "function", name, False)
    raise _bad("tool_choice", 'must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')


# --------------------------------------------------------------------------- the prompt

def family_of(template: str | None) -> str:
    """Which call syntax the chat template teaches its model."""
    t = template or ""
    if "<tool_call>" in t:
        return "hermes"
    if "[TOOL_CALLS]" in t:
        return "mistral-args" if "[ARGS]" in t else "mistral"
    if "<|python_tag|>" in t or "ipython" in t:
        return "llama3"
    return "generic"


def _generic_system(spec: ToolSpec) -> str:
    lines = "\n".join(json.dumps(t.openai(), ensure_ascii=False) for t in spec.tools)
    return ("You may call functions to answer the user. The functions, as JSON, within <tools></tools>:\n"
            f"<tools>\n{lines}\n</tools>\nTo call one, answer with a JSON object within <tool_call></tool_call> "
            'tags and nothing else:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>")


def _arguments(call: Mapping[str, Any]) -> Any:
    """An assistant message's call arguments as the object templates print (clients send a JSON string)."""
    args = (call.get("function") or {}).get("arguments", {})
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return args
    return args


def render_inputs(messages: list[dict[str, Any]], spec: ToolSpec | None, family: str
                  ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The messages and extra template variables to render a conversation with tools."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = [{**c, "function": {**(c.get("function") or {}), "arguments": _arguments(c)}}
                     for c in m["tool_calls"]]
            if family == "generic":  # the template knows no tool calls: show them as the hermes text
                text = "".join(f'<tool_call>\n{json.dumps({"name": c["function"].get("name"), "arguments": c["function"]["arguments"]}, ensure_ascii=False)}\n</tool_call>'
                               for c in calls)
                m = {"role": "assistant", "content": (m.get("content") or "") + text}
            else:
                m["tool_calls"] = calls
        elif m.get("role") == "tool" and family == "generic":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
        out.append(m)
    if spec is None or not spec.active:
        return out, {}
    if family == "generic":
        # into the system message if there is one; else before the first user turn (Gemma's
        # templates, for one, refuse a system role)
        k = 0 if out and out[0].get("role") == "system" else next(
            (i for i, m in enumerate(out) if m.get("role") == "user"), None)
        if k is None:
            out.insert(0, {"role": "system", "content": _generic_system(spec)})
        elif out[k].get("role") == "system":
            out[k] = {**out[k], "content": out[k]["content"] + "\n\n" + _generic_system(spec)}
        else:
            out[k] = {**out[k], "content": _generic_system(spec) + "\n\n" + out[k]["content"]}
        return out, {}
    return out, {"tools": [t.openai() for t in spec.tools]}


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Shape of assistant ``tool_calls`` and tool messages' ``tool_call_id``."""
    for i, m in enumerate(messages):
        calls = m.get("tool_calls")
        if calls is not None:
            if m.get("role") != "assistant" or not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls", "must be a list on an assistant message")
            for j, c in enumerate(calls):
                f = c.get("function") if isinstance(c, Mapping) else None
                if not isinstance(f, Mapping) or not isinstance(f.get("name"), str):
                    raise _bad(f"messages[{i}].tool_calls[{j}]", 'must be {"id", "type": "function", '
                               '"function": {"name", "arguments"}}')
        if m.get("role") == "tool" and not isinstance(m.get("tool_call_id", ""), str):
            raise _bad(f"messages[{i}].tool_call_id", "must be a string")


# --------------------------------------------------------------------------- the grammar

def _call_schema(name: str, parameters: dict[str, Any], family: str) -> dict[str, Any]:
    key = "parameters" if family == "llama3" else "arguments"
    return {"type": "object", "properties": {"name": {"const": name}, key: parameters},
            "required": ["name", key], "additionalProperties": False}


def _lift_defs(tools: list[Tool]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each tool's parameters with its ``$defs``/``definitions`` moved into one table for the root
    (renamed per tool: two tools may both define ``City``). A tool's schema sits inside the call's
    schema, and its ``#/$defs/...`` references resolve from the root: pydantic writes them for
    every nested model (pydantic-ai, LangChain)."""
    params: list[dict[str, Any]] = []
    table: dict[str, Any] = {}
    for i, t in enumerate(tools):
        p = dict(t.parameters)
        local = {**(p.pop("definitions", None) or {}), **(p.pop("$defs", None) or {})}
        names = {k: f"t{i}-{k}" for k in local}

        def ref(r: str) -> str:
            for prefix in ("#/$defs/", "#/definitions/"):
                if r.startswith(prefix) and r[len(prefix):] in names:
                    return "#/$defs/" + names[r[len(prefix):]]
            return r

        def fix(v: Any) -> Any:
            if isinstance(v, Mapping):
                return {k: ref(x) if k == "$ref" and isinstance(x, str) else fix(x) for k, x in v.items()}
            return [fix(x) for x in v] if isinstance(v, list) else v

        params.append(fix(p))
        table.update({names[k]: fix(v) for k, v in local.items()})
    return params, table


def call_grammar(spec: ToolSpec, family: str) -> str | None:
    """A GBNF grammar that admits only valid calls (``required`` or a named function), else None."""
    from localllm import runtime

    if not spec.active or spec.choice == "auto":
        return None
    tools = [t for t in ([spec.by_name(spec.named)] if spec.named else list(spec.tools)) if t is not None]
    params, table = _lift_defs(tools)
    defs = {"$defs": table} if table else {}
    schemas = [_call_schema(t.name, p, family) for t, p in zip(tools, params)]
    if family == "mistral-args":  # the name outside the JSON: arguments of any tool, paired up when parsed
        args = runtime.json_schema_to_grammar({**params[0], **defs} if len(params) == 1
                                              else {"anyOf": params, **defs})
        names = " | ".join(json.dumps(t.name) for t in tools)
        return (args.replace("root ::=", "tool-args-json ::=", 1) + f"\ntool-name ::= {names}\n"
                + 'root ::= "[TOOL_CALLS]" tool-name "[ARGS]" tool-args-json\n')
    if family == "mistral":
        inner = {"type": "array", "items": schemas[0] if len(schemas) == 1 else {"anyOf": schemas},
                 "minItems": 1, **({} if spec.parallel else {"maxItems": 1}), **defs}
        body = runtime.json_schema_to_grammar(inner)
        return body.replace("root ::=", "tool-calls-json ::=", 1) + '\nroot ::= "[TOOL_CALLS]" tool-calls-json\n'
    body = runtime.json_schema_to_grammar({**schemas[0], **defs} if len(schemas) == 1 else {"anyOf": schemas, **defs})
    body = body.replace("root ::=", "tool-call-json ::=", 1)
    if family == "llama3":
        return body + "\nroot ::= tool-call-json\n"
    block = 'tool-call-block ::= "<tool_call>\\n" tool-call-json "\\n</tool_call>"\n'
    more = ' ("\\n" tool-call-block)*' if spec.parallel else ""
    return body + "\n" + block + f"root ::= tool-call-block{more}\n"


def with_grammar(params: Any, spec: ToolSpec | None, family: str) -> Any:
    """``params`` (SamplingParams) constrained to valid calls when ``tool_choice`` is required or named."""
    import dataclasses

    g = call_grammar(spec, family) if spec is not None else None
    if g is None:
        return params
    if params.grammar is not None or params.json_schema is not None:
        raise _bad("tool_choice", "required or a named function cannot be combined with a grammar or "
                                  "response_format: the call's own grammar decides the output")
    return dataclasses.replace(params, grammar=g)


# --------------------------------------------------------------------------- parsing

@dataclass
class Parsed:
    """An answer split into content and calls; ``error`` says why text that looked like a call is not one."""

    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


def _validate(spec: ToolSpec, name: Any, args: Any) -> str | None:
    if not isinstance(name, str) or spec.by_name(name) is None:
        return f"the model called an unknown function {name!r}"
    if not isinstance(args, dict):
        return f"the arguments of {name} are not a JSON object"
    schema = spec.by_name(name).parameters  # type: ignore[union-attr]
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        return f"the call to {name} lacks the required argument(s) {', '.join(map(str, missing))}"
    return None


def _call(name: str, args: dict[str, Any], family: str) -> dict[str, Any]:
    # Mistral's templates refuse call ids that are not 9 letters or digits
    cid = uuid.uuid4().hex[:9] if family.startswith("mistral") else "call_" + uuid.uuid4().hex[:24]
    return {"id": cid, "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}


def _raw_calls(text: str, family: str) -> tuple[list[tuple[Any, Any]], str, bool] | str:
    """(name/arguments pairs, the text around them, whether the text looked like a call) or an error."""
    s = text.strip()
    if family in ("hermes", "generic"):
        blocks = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", s, flags=re.S)
        if not blocks:
            return [], text, False
        rest = re.sub(r"<tool_call>.*?(?:</tool_call>|$)", "", s, flags=re.S).strip()
        objs = [json.loads(b.strip()) for b in blocks]
        return [(o.get("name"), o.get("arguments", {})) for o in objs], rest, True
    if family.startswith("mistral"):
        if "[TOOL_CALLS]" not in s:
            return [], text, False
        head, _, tail = s.partition("[TOOL_CALLS]")
        if "[ARGS]" in tail:
            pairs = re.findall(r"([A-Za-z0-9_.\-]+)(?:\[CALL_ID\][A-Za-z0-9]*)?\[ARGS\](\{.*?\})\s*(?=\[TOOL_CALLS\]|$)",
                               tail.replace("\n", " "))
            return [(n, json.loads(a)) for n, a in pairs], head.strip(), True
        arr = json.loads(tail.strip())
        return [(o.get("name"), o.get("arguments", {})) for o in (arr if isinstance(arr, list) else [arr])], head.strip(), True
    # llama3: the whole answer is one JSON object
    body = s.removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return [], text, False
    o = json.loads(body)
    return [(o.get("name"), o.get("parameters", o.get("arguments", {})))], "", True


def parse(text: str, spec: ToolSpec | None, family: str) -> Parsed:
    """Split a finished answer into content and validated calls; never loses the text."""
    if spec is None or not spec.active:
        return Parsed(text)
    try:
        found = _raw_calls(text, family)
    except (ValueError, AttributeError, TypeError) as e:
        return Parsed(text, [], f"the answer looks like a tool call but is not valid JSON ({str(e)[:120]})")
    pairs, rest, looked = found  # type: ignore[misc]
    if not looked:
        return Parsed(text)
    for name, args in pairs:
        err = _validate(spec, name, args)
        if err:
            return Parsed(text, [], err)
    if not pairs:
        return Parsed(text, [], "the answer starts a tool call but holds none")
    return Parsed(rest or None, [_call(n, a, family) for n, a in pairs])


__all__ = ["Tool", "ToolSpec", "Parsed", "spec_from", "family_of", "render_inputs", "check_messages",
           "call_grammar", "with_grammar", "parse"]
