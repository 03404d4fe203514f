"""Chat templates: the GGUF's `tokenizer.chat_template` (Jinja2) rendered the way transformers and llama-cpp-python do.

Environment: `ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with `loopcontrols` and a no-op
`{% generation %}` tag (HF marks assistant spans with it), a `tojson` that does not HTML-escape, and the globals
`raise_exception(msg)` and `strftime_now(fmt)`. Templates see `messages`, `add_generation_prompt`, `bos_token`,
`eos_token`, `tools`, `documents`, `functions`, `tool_choice` and any extra keyword.

A GGUF without a template gets a built-in fallback: the Gemma turn format for `gemma*` architectures (their
`<start_of_turn>`/`<end_of_turn>` control tokens make it the only sensible choice; a system message is prepended to
the first user turn as Gemma 3's own template does), ChatML for everything else (llama.cpp's default too).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import sys
import time
from datetime import datetime
from typing import Any

import jinja2
import jinja2.compiler
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# A template runs in-process, so what it may do is bounded: every string or list it builds (operators, filters,
# method calls, `~` concatenation) and what it outputs stay under MAX_CHARS, and its compiled code stops with an
# error after MAX_SECONDS (a deadline checked on every line it runs). Real templates render in milliseconds and
# produce a prompt far below the limit.
MAX_CHARS = 1 << 25  # 32 Mi characters: 60x a 128k-token prompt
MAX_SECONDS = 5.0

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% set ns = namespace(system='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = ns.system + message['content'] + '\n\n' %}"
    "{% else %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{% if role == 'user' and ns.system %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class TemplateRaised(jinja2.TemplateError):
    """raise_exception() called by a template (e.g. "roles must alternate")."""


class TemplateLimit(jinja2.TemplateError):
    """A template exceeded MAX_CHARS or MAX_SECONDS."""


def _sized(value: Any) -> Any:
    if isinstance(value, (str, bytes, list, tuple)) and len(value) > MAX_CHARS:
        raise TemplateLimit(f"it built a value of {len(value):,} items (limit {MAX_CHARS:,})")
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    """Widths and counts passed to a filter or method (center(10**10), '%*s', ...) stay under MAX_CHARS."""
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > MAX_CHARS:
            raise TemplateLimit(f"an argument of {a} exceeds the size limit {MAX_CHARS:,}")


def _check_format(fmt: str) -> None:
    """A width or precision inside a format string ('%99999999999d', '{:>99999999999}')."""
    if any(len(d) > 8 for d in re.findall(r"\d+", fmt)):
        raise TemplateLimit("a format string asks for a width beyond the size limit")


def _length(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple)) else 0


def _guarded_filter(f: Any) -> Any:
    @functools.wraps(f)  # keeps jinja's pass_context / pass_eval_context markers
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check_args(args, kwargs)
        if f.__name__ == "do_replace" and len(args) >= 4:  # (eval_ctx, s, old, new): the result may grow
            if _length(args[1]) * max(1, _length(args[3])) > MAX_CHARS:
                raise TemplateLimit("replace() would build a string beyond the size limit")
        return _sized(f(*args, **kwargs))

    return guarded


class _CodeGenerator(jinja2.compiler.CodeGenerator):
    """Compiles `a ~ b` so that the joined string is size-checked (a doubling loop would otherwise grow
    unboundedly between output checks)."""

    def visit_Concat(self, node: jinja2.nodes.Concat, frame: jinja2.compiler.Frame) -> None:
        self.write("environment.sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Environment(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    @staticmethod
    def sized(value: Any) -> Any:
        return _sized(value)

    def call_binop(self, context: jinja2.runtime.Context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            n = right if isinstance(left, (str, list, tuple)) else left if isinstance(right, (str, list, tuple)) \
                else None
            if isinstance(n, int) and n * max(_length(left), _length(right)) > MAX_CHARS:
                raise TemplateLimit("a repetition would build a value beyond the size limit")
            if isinstance(left, int) and isinstance(right, int) and left.bit_length() + right.bit_length() > 4096:
                raise TemplateLimit("an integer product beyond 4096 bits")
        elif op == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                    right * max(1, abs(left).bit_length()) > 4096:
                raise TemplateLimit("a power beyond 4096 bits")
        elif op == "+":
            if _length(left) + _length(right) > MAX_CHARS:
                raise TemplateLimit("a concatenation beyond the size limit")
        elif op == "%" and isinstance(left, str):
            _check_format(left)
            _check_args(right if isinstance(right, tuple) else (right,), {})
        return _sized(operator_table[op](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, str) and attribute in ("format", "format_map"):
            _check_format(obj)
        return super().getattr(obj, attribute)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _check_args(args, kwargs)
        return _sized(super().call(__context, __obj, *args, **kwargs))


operator_table = {"*": operator.mul, "**": operator.pow, "+": operator.add, "%": operator.mod}


class _Deadline:
    """Stops the template's compiled code (jinja compiles from_string templates to "<template>") once `seconds`
    have passed: a line tracer on its frames only, for this thread, while rendering. Jinja runs in-process and a
    thread cannot be killed, so the check must run inside the template's own loop. If a tracer is already installed
    (a debugger, coverage) it is left alone and only the size limits apply."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self) -> _Deadline:
        self.previous = sys.gettrace()
        self.deadline = time.monotonic() + self.seconds
        if self.previous is None:
            sys.settrace(self._call)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is None:
            sys.settrace(None)

    def _call(self, frame: Any, event: str, arg: Any) -> Any:
        return self._line if frame.f_code.co_filename == "<template>" else None

    def _line(self, frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"it ran longer than {self.seconds:g} s")
        return self._line


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF's marker of assistant text for training masks): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)  # the tag name
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would corrupt prompts
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = _Environment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guarded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(kv: dict, key: str, default: int | None) -> str:
    tokens = kv.get("tokenizer.ggml.tokens") or []
    i = kv.get(f"tokenizer.ggml.{key}", default)
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""


class ChatTemplate:
    """A compiled chat template. `render(messages)` gives the prompt text (tokenize it with special=True)."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", name: str = "default",
                 max_seconds: float = MAX_SECONDS):
        self.max_seconds = max_seconds
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        if not isinstance(template, str):
            raise ValueError(f"chat template {name!r} is not a string")
        if len(template) > MAX_CHARS:
            raise ValueError(f"chat template {name!r} is {len(template):,} characters (limit {MAX_CHARS:,})")
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template {name!r} does not compile: {e.message} (line {e.lineno})") from None
        except (RecursionError, MemoryError, jinja2.TemplateError) as e:  # e.g. thousands of nested blocks
            raise ValueError(f"chat template {name!r} does not compile: {type(e).__name__}") from None

    @staticmethod
    def names_in_gguf(kv: dict) -> list[str]:
        """Templates a GGUF carries: "default" for tokenizer.chat_template, then the named ones."""
        prefix = "tokenizer.chat_template."
        names = ["default"] if isinstance(kv.get("tokenizer.chat_template"), str) else []
        return names + sorted(k[len(prefix):] for k in kv if k.startswith(prefix))

    @classmethod
    def from_gguf(cls, kv: dict, name: str | None = None) -> ChatTemplate:
        """The GGUF's template (`name`: one of `tokenizer.chat_template.<name>`), else the documented fallback."""
        model = kv.get("tokenizer.ggml.model")
        defaults = (1, 2) if model == "llama" else (11, 11) if model == "gpt2" else (None, None)
        bos = _token_text(kv, "bos_token_id", defaults[0])
        eos = _token_text(kv, "eos_token_id", defaults[1])
        if name not in (None, "default"):
            source = kv.get(f"tokenizer.chat_template.{name}")
            if not isinstance(source, str):
                raise ValueError(f"GGUF has no chat template {name!r}; it has: "
                                 f"{', '.join(cls.names_in_gguf(kv)) or 'none'}")
            return cls(source, bos, eos, name)
        source = kv.get("tokenizer.chat_template")
        if isinstance(source, str) and source.strip():
            return cls(source, bos, eos, "default")
        if str(kv.get("general.architecture", "")).startswith("gemma"):
            return cls(GEMMA_TEMPLATE, bos, eos, "gemma (built-in fallback)")
        return cls(CHATML_TEMPLATE, bos, eos, "chatml (built-in fallback)")

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict] | None = None, documents: list[dict] | None = None,
               continue_final_message: bool = False, **kwargs: Any) -> str:
        """Prompt text for `messages` ([{"role": ..., "content": ...}, ...]). continue_final_message: leave the
        last (assistant) message open so the model continues it, as transformers does."""
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are mutually exclusive")
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "functions": None,
                     "function_call": None, "tool_choice": None, **kwargs}
        try:
            with _Deadline(self.max_seconds):
                text = self._render(messages=messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    documents=documents, **variables)
        except TemplateRaised as e:
            raise ValueError(f"chat template {self.name!r} rejected the conversation: {e.message}") from None
        except TemplateLimit as e:
            raise ValueError(f"chat template {self.name!r} stopped: {e.message}") from None
        except MemoryError:
            raise ValueError(f"chat template {self.name!r} failed: out of memory") from None
        except Exception as e:  # anything a template's code raises (1/0, range(10**9), a recursive macro, ...)
            raise ValueError(f"chat template {self.name!r} failed: {type(e).__name__}: {e}") from None
        if continue_final_message:
            text = self._cut_after_final(text, messages)
        return text

    def _render(self, **variables: Any) -> str:
        """The output, streamed so that a template printing without end stops at MAX_CHARS."""
        parts, n = [], 0
        for piece in self._template.generate(**variables):
            n += len(piece)
            if n > MAX_CHARS:
                raise TemplateLimit(f"its output exceeds {MAX_CHARS:,} characters")
            parts.append(piece)
        return "".join(parts)

    @staticmethod
    def _cut_after_final(text: str, messages: list[dict[str, Any]]) -> str:
        final = messages[-1].get("content") if messages else None
        if not isinstance(final, str) or not final.strip():
            raise ValueError("continue_final_message needs a final message with text content")
        for probe in (final, final.strip()):  # templates often trim the content
            pos = text.rfind(probe)
            if pos >= 0:
                return text[:pos + len(probe)]
        raise ValueError("continue_final_message: the final message does not appear in the rendered prompt")

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, bos_token={self.bos_token!r}, eos_token={self.eos_token!r})"
