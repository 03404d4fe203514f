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

import json
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

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
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                       extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def _token_text(kv: dict, key: str, default: int | None) -> str:
    tokens = kv.get("tokenizer.ggml.tokens") or []
    i = kv.get(f"tokenizer.ggml.{key}", default)
    return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else ""


class ChatTemplate:
    """A compiled chat template. `render(messages)` gives the prompt text (tokenize it with special=True)."""

    def __init__(self, template: str, bos_token: str = "", eos_token: str = "", name: str = "default"):
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.name = name
        try:
            self._template = _environment().from_string(template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"chat template {name!r} does not compile: {e.message} (line {e.lineno})") from None

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
            text = self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=tools, documents=documents, **variables)
        except TemplateRaised as e:
            raise ValueError(f"chat template {self.name!r} rejected the conversation: {e.message}") from None
        except (jinja2.TemplateError, TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
            raise ValueError(f"chat template {self.name!r} failed: {type(e).__name__}: {e}") from e
        if continue_final_message:
            text = self._cut_after_final(text, messages)
        return text

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
