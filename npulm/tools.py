"""Tool calls: the tools go to the model through its own chat template (GGUF templates that take `tools`), and the
text it writes is parsed back into OpenAI `tool_calls` for the common formats:

- hermes:  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen 2/2.5/3, SmolLM3, ...)
- llama3:  a bare `{"name": ..., "parameters": {...}}` (Llama 3.1+ custom tools; `<|python_tag|>` allowed)
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`

A template that does not take tools gets them described in a system message asking for the hermes format (as
llama.cpp's generic fallback does). `tool_choice="required"` or a named function constrains the output with a
grammar (npulm.grammar) to a call in the model's format whose arguments match the tool's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("hermes", "llama3", "mistral")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_MARKERS = ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{")


def detect_format(template_source: str) -> str:
    """Which call format a chat template teaches its model."""
    if "[TOOL_CALLS]" in template_source:
        return "mistral"
    if "<|python_tag|>" in template_source or "ipython" in template_source:
        return "llama3"
    return "hermes"


def template_takes_tools(template_source: str) -> bool:
    return "tools" in template_source


def normalize_tools(tools: Sequence[Mapping] | None, functions: Sequence[Mapping] | None) -> list[dict] | None:
    """OpenAI tools ([{"type": "function", "function": {...}}]); the legacy `functions` list becomes tools."""
    if functions:
        if tools:
            raise ValueError("give either tools or functions, not both")
        tools = [{"type": "function", "function": dict(f)} for f in functions]
    if not tools:
        return None
    out = []
    for t in tools:
        fn = t.get("function") if isinstance(t, Mapping) else None
        if t.get("type", "function") != "function" or not isinstance(fn, Mapping) or not fn.get("name"):
            raise ValueError(f"tool {t!r} is not {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        out.append({"type": "function", "function": dict(fn)})
    return out


def normalize_choice(tool_choice: Any, function_call: Any, tools: list[dict] | None) -> str | dict:
    """'none', 'auto', 'required' or {"type": "function", "function": {"name": ...}} (checked against tools)."""
    if function_call is not None and tool_choice is None:  # legacy: "none" | "auto" | {"name": ...}
        tool_choice = function_call if isinstance(function_call, str) else {"type": "function",
                                                                            "function": dict(function_call)}
    if tool_choice is None:
        return "auto" if tools else "none"
    if isinstance(tool_choice, str):
        if tool_choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice {tool_choice!r} is not none, auto, required or a named function")
        if tool_choice == "required" and not tools:
            raise ValueError("tool_choice 'required' needs tools")
        return tool_choice
    name = (tool_choice.get("function") or {}).get("name") if isinstance(tool_choice, Mapping) else None
    names = [t["function"]["name"] for t in tools or []]
    if name not in names:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools {names}")
    return {"type": "function", "function": {"name": name}}


def messages_for_template(messages: Sequence[Mapping]) -> list[dict]:
    """OpenAI messages as templates expect them: tool-call arguments as dicts (clients send JSON strings)."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                c = dict(c)
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                c["function"] = fn
                calls.append(c)
            m["tool_calls"] = calls
        if m.get("content") is None:
            m["content"] = ""
        out.append(m)
    return out


def system_prompt(tools: list[dict]) -> str:
    """Hermes-style tool instructions for templates that do not take tools."""
    sigs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You may call one or more functions to help with the user query. The functions are:\n<tools>\n"
            f"{sigs}\n</tools>\nFor each call, reply with a JSON object holding the function name and arguments "
            "inside tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>")


def with_tool_prompt(messages: list[dict], tools: list[dict]) -> list[dict]:
    """Tool roles and calls rendered as text, and the instructions prepended to (or merged into) the system turn."""
    prompt = system_prompt(tools)
    out = []
    for m in messages:
        if m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content', '')}\n</tool_response>"}
        elif m.get("tool_calls"):
            calls = "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"].get("arguments", {})})
                              + "\n</tool_call>" for c in m["tool_calls"])
            m = {"role": m["role"], "content": ((m.get("content") or "") + "\n" + calls).strip()}
        out.append(m)
    if out and out[0].get("role") == "system":
        return [{"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}, *out[1:]]
    return [{"role": "system", "content": prompt}, *out]


def _call(name: str, arguments: Any) -> dict:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments if arguments is not None else {},
                                                                      ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": args}}


def _as_call(obj: Any, names: set[str] | None) -> dict | None:
    if not isinstance(obj, Mapping):
        return None
    if isinstance(obj.get("function"), Mapping):  # {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or (names is not None and name not in names):
        return None
    return _call(name, obj.get("arguments", obj.get("parameters", {})))


def _json_prefix(text: str) -> tuple[Any, str] | None:
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError:
        return None
    return obj, text[end:]


def parse_tool_calls(text: str, fmt: str = "hermes", names: set[str] | None = None) -> tuple[str | None, list[dict]]:
    """(remaining content or None, OpenAI tool_calls) from a model's reply. Any of the three formats is recognized
    whatever `fmt` says (models drift); calls to functions not in `names` are left as text."""
    calls: list[dict] = []
    content = text
    if "<tool_call>" in text:
        for m in _HERMES.finditer(text):
            parsed = _json_prefix(m.group(1))
            call = _as_call(parsed[0], names) if parsed else None
            if call:
                calls.append(call)
        if calls:
            content = _HERMES.sub("", text)
    elif "[TOOL_CALLS]" in text:
        head, _, rest = text.partition("[TOOL_CALLS]")
        parsed = _json_prefix(rest.strip())
        items = parsed[0] if parsed else None
        for obj in items if isinstance(items, list) else [items]:
            call = _as_call(obj, names)
            if call:
                calls.append(call)
        if calls:
            content = head + (parsed[1] if parsed else "")
    else:
        stripped = text.strip().removeprefix("<|python_tag|>").strip()
        while stripped.startswith("{"):  # llama3: one or more bare JSON calls (";"-separated in some templates)
            parsed = _json_prefix(stripped)
            call = _as_call(parsed[0], names) if parsed else None
            if call is None:
                break
            calls.append(call)
            stripped = parsed[1].strip().lstrip(";").strip()
        if calls:
            content = stripped
    content = content.strip()
    return (content or None) if calls else text, calls


def may_start_call(text: str) -> bool:
    """Whether streamed text so far could be the start of a tool call (then it is held back until the end)."""
    s = text.lstrip()
    return any(m.startswith(s) or s.startswith(m) for m in _MARKERS) if s else True


def call_grammar(tools: list[dict], choice: str | dict, fmt: str) -> str:
    """An llguidance grammar for one call (named) or one or more calls (required) in the model's format."""
    from .grammar import lark_grammar

    if isinstance(choice, Mapping):
        tools = [t for t in tools if t["function"]["name"] == choice["function"]["name"]]
    args_key = "parameters" if fmt == "llama3" else "arguments"
    variants = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        args_key: t["function"].get("parameters") or {"type": "object"}}, "required": ["name", args_key],
        "additionalProperties": False} for t in tools]
    from .grammar import JSON_OPTIONS

    schema = json.dumps({**(variants[0] if len(variants) == 1 else {"anyOf": variants}), "x-guidance": JSON_OPTIONS})
    if fmt == "mistral":
        return lark_grammar(f'start: "[TOOL_CALLS] [" call ("," " " call)* "]"\ncall: %json {schema}')
    if fmt == "llama3":
        return lark_grammar(f"start: call\ncall: %json {schema}")
    return lark_grammar(f'start: call ("\\n" call)*\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n'
                        f"body: %json {schema}")


class ToolUse:
    """One chat request's tools, as the Python API and the server both use them: `prompt(apply_template)` renders
    the messages with the tools (through the template, or a system message where it takes none), `grammar` is the
    constraint of a required / named tool_choice (None otherwise), `message(text, reason)` the reply as an OpenAI
    message with `tool_calls` parsed out of the text."""

    def __init__(self, messages: Sequence[Mapping], tools: Sequence[Mapping] | None, tool_choice: Any,
                 template_source: str, functions: Sequence[Mapping] | None = None, function_call: Any = None):
        self.tools = normalize_tools(tools, functions)
        self.choice = normalize_choice(tool_choice, function_call, self.tools)
        self.legacy = bool(functions)  # the reply also carries `function_call`
        self.calling = bool(self.tools) and self.choice != "none"
        self.messages = messages_for_template(messages)
        self.format = detect_format(template_source)
        self.in_template = not self.calling or template_takes_tools(template_source)
        if not self.in_template:
            self.messages, self.format = with_tool_prompt(self.messages, self.tools), "hermes"
        self.grammar = call_grammar(self.tools, self.choice, self.format) if self.calling and \
            self.choice != "auto" else None
        self.names = {t["function"]["name"] for t in self.tools} if self.calling else None

    def prompt(self, apply_template: Any) -> Any:
        """apply_template(messages, **kw) with the tools where the template takes them."""
        if self.in_template and self.calling:
            return apply_template(self.messages, tools=self.tools, tool_choice=self.choice)
        return apply_template(self.messages)

    def message(self, text: str, reason: str) -> tuple[dict, str]:
        """The assistant message of a finished reply and its finish reason ("tool_calls" when it called)."""
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if self.calling:
            content, calls = parse_tool_calls(text, self.format, self.names)
            if calls:
                msg = {"role": "assistant", "content": content, "tool_calls": calls}
                if self.legacy:
                    msg["function_call"] = calls[0]["function"]
                reason = "function_call" if self.legacy else "tool_calls"
        return msg, reason

    def call_delta(self, text: str, reason: str) -> tuple[dict, str]:
        """A held-back streamed reply as its last delta: `tool_calls` (with an index each) or plain content."""
        msg, reason = self.message(text, reason)
        calls = [{"index": i, **c} for i, c in enumerate(msg.get("tool_calls", []))]
        delta: dict[str, Any] = {"tool_calls": calls} if calls else {"content": text}
        if calls and msg.get("content"):
            delta["content"] = msg["content"]
        return delta, reason
