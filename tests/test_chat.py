"""Chat templates: environment semantics, the real models' templates and llama.cpp's corpus of real templates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npulm import assets
from npulm.chat import CHATML_TEMPLATE, ChatTemplate
from npulm.gguf import GGUFFile

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there. How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
]


def test_environment_features():
    t = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
        "{% generation %}[{{ m.role }}]{% endgeneration %}{{ m | tojson }}{% endfor %}{{ eos_token }}"
        "{{ strftime_now('%Y') | length }}",
        bos_token="<s>", eos_token="</s>")
    out = t.render([{"role": "user", "content": "<b>&'é"}] * 3)
    # tojson does not HTML-escape and keeps non-ASCII; loopcontrols and {% generation %} work
    assert out == '<s>[user]{"role": "user", "content": "<b>&\'é"}[user]{"role": "user", "content": "<b>&\'é"}</s>4'


def test_trim_and_lstrip_blocks():
    t = ChatTemplate("{% for m in messages %}\n    {% if true %}\n{{ m.content }}\n    {% endif %}\n{% endfor %}")
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a\nb\n"


def test_errors_are_value_errors():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    raising = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="roles must alternate"):
        raising.render(CONVERSATION)
    with pytest.raises(ValueError, match="failed"):
        ChatTemplate("{{ messages[0].content + 1 }}").render(CONVERSATION)
    with pytest.raises(ValueError):  # the sandbox refuses mutation and private attributes
        ChatTemplate("{{ messages.append(1) }}").render(CONVERSATION)


def test_chatml_and_continue_final_message():
    t = ChatTemplate(CHATML_TEMPLATE)
    assert t.render(CONVERSATION[1:2]) == "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n"
    assert t.render(CONVERSATION[:3], add_generation_prompt=False, continue_final_message=True).endswith(
        "<|im_start|>assistant\nHi there. How can I help?")


def test_from_gguf_named_and_fallback_templates():
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["<|endoftext|>"] * 12,
          "tokenizer.ggml.bos_token_id": 0, "tokenizer.chat_template": "A{{ bos_token }}",
          "tokenizer.chat_template.tool_use": "B"}
    assert ChatTemplate.names_in_gguf(kv) == ["default", "tool_use"]
    assert ChatTemplate.from_gguf(kv).render([]) == "A<|endoftext|>"
    assert ChatTemplate.from_gguf(kv, "tool_use").render([]) == "B"
    with pytest.raises(ValueError, match="tool_use"):
        ChatTemplate.from_gguf(kv, "rag")
    del kv["tokenizer.chat_template"]
    assert ChatTemplate.from_gguf(kv).source == CHATML_TEMPLATE
    gemma = ChatTemplate.from_gguf({**kv, "general.architecture": "gemma3"})
    assert gemma.render(CONVERSATION[1:2]) == (
        "<|endoftext|><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n")


def _model_kv(name: str) -> dict:
    try:
        return GGUFFile(assets.model_path(name)).kv
    except assets.AssetError as e:
        pytest.skip(str(e))


def test_smollm2_template_is_chatml():
    t = ChatTemplate.from_gguf(_model_kv(assets.SMOLLM2))
    assert t.name == "default" and t.bos_token == "<|im_start|>" and t.eos_token == "<|im_end|>"
    assert t.render(CONVERSATION) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHello!<|im_end|>\n"
        "<|im_start|>assistant\nHi there. How can I help?<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # SmolLM2's template adds its own system prompt when there is none
    assert t.render(CONVERSATION[1:2], add_generation_prompt=False).startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_gemma3_gets_the_gemma_turn_format():
    kv = _model_kv(assets.GEMMA3)
    # this GGUF carries no tokenizer.chat_template, so the built-in Gemma fallback applies
    assert "tokenizer.chat_template" not in kv
    t = ChatTemplate.from_gguf(kv)
    assert (t.bos_token, t.eos_token) == ("<bos>", "<eos>")
    assert t.render(CONVERSATION) == (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\nHello!<end_of_turn>\n"
        "<start_of_turn>model\nHi there. How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n")


# --- llama.cpp's models/templates/*.jinja ------------------------------------------------------------------------
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
# Templates that cannot render the plain conversation, and what they need instead.
KNOWN = {
    "CohereForAI-c4ai-command-r-plus-tool_use": ("tool_use variant: iterates over `tools`", {"tools": TOOLS}),
    "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use": ("tool_use variant: iterates over `tools`", {"tools": TOOLS}),
    "NousResearch-Hermes-3-Llama-3.1-8B-tool_use": ("tool_use variant: iterates over `tools`", {"tools": TOOLS}),
    "fireworks-ai-llama-3-firefunction-v2": ("needs `functions` (JSON text) and `datetime` strings",
                                             {"functions": json.dumps(TOOLS), "datetime": "2026-01-01"}),
    "google-gemma-2-2b-it": ("Gemma 2 rejects the system role by design", {"drop_system": True}),
}


@pytest.fixture(scope="module")
def template_dir() -> Path:
    try:
        d = assets.llama_cpp_models_dir() / "templates"
    except assets.AssetError as e:
        pytest.skip(f"llama.cpp templates unavailable: {e}")
    if not d.is_dir():
        pytest.skip("this llama.cpp version ships no models/templates")
    return d


def _template_names() -> list:
    """Names for parametrization; read from the cache only (collection must not download)."""
    d = assets.cache_dir() / "data" / "llama.cpp-models" / "templates"
    names = sorted(p.stem for p in d.glob("*.jinja")) if d.is_dir() else []
    return [pytest.param(n, marks=pytest.mark.xfail(strict=True, raises=ValueError, reason=KNOWN[n][0]))
            if n in KNOWN else n for n in names] or [pytest.param("none", marks=pytest.mark.skip("not cached"))]


def _render_file(path: Path, messages: list[dict], **kw) -> str:
    t = ChatTemplate(path.read_text(encoding="utf-8"), bos_token="<s>", eos_token="</s>", name=path.stem)
    out = t.render(messages, **kw)
    for m in messages:
        assert m["content"] in out, f"{path.stem}: {m['content']!r} missing from the prompt"
    return out


@pytest.mark.parametrize("name", _template_names())
def test_llama_cpp_template_renders_conversation(template_dir, name):
    _render_file(template_dir / f"{name}.jinja", CONVERSATION)


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_templates_render_with_what_they_need(template_dir, name):
    path = template_dir / f"{name}.jinja"
    if not path.is_file():
        pytest.skip(f"{name} not in this llama.cpp version")
    kw = dict(KNOWN[name][1])
    messages = CONVERSATION[1:] if kw.pop("drop_system", False) else CONVERSATION
    _render_file(path, messages, **kw)


def test_template_corpus_counts(template_dir):
    """At least 65 of llama.cpp's ~70 templates render the plain conversation; only the known ones fail."""
    ok, failed = [], []
    for p in sorted(template_dir.glob("*.jinja")):
        try:
            _render_file(p, CONVERSATION)
            ok.append(p.stem)
        except ValueError:
            failed.append(p.stem)
    assert set(failed) <= set(KNOWN), f"unexpected failures: {sorted(set(failed) - set(KNOWN))}"
    assert len(ok) >= 65, f"only {len(ok)} of {len(ok) + len(failed)} templates render"


# --- hostile templates (issue 14 item 5): every one a ValueError naming the template, none hangs -------------------
@pytest.mark.parametrize("source, message", [
    ("{{ 1/0 }}", "failed: ZeroDivisionError"),
    ("{{ range(10**9)|list }}", "stopped: an argument of 1000000000 exceeds the size limit"),
    ("{{ 'a' * 10**10 }}", "stopped: a repetition would build a value beyond the size limit"),
    ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "failed: RecursionError"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran longer than 0.5 s"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "stopped"),
    # doubling strings: stopped by the size limit (or the deadline first, on a busy machine)
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "stopped"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "stopped"),
    ("{{ 'x'|center(10**10) }}", "stopped: an argument of 10000000000"),
    ("{{ 'x'.center(10**10) }}", "stopped: an argument of 10000000000"),
    ("{{ '%99999999999d' % 1 }}", "stopped: a format string asks for a width"),
    ("{{ '{:>99999999999}'.format(1) }}", "stopped: a format string asks for a width"),
    ("{{ ('a' * 100000)|replace('a', 'b' * 100000) }}", "stopped: replace() would build"),
    ("{{ 7 ** 100000 }}", "stopped: a power beyond 4096 bits"),
    ("{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}", "failed: RecursionError"),
])
def test_hostile_templates_are_clear_errors(source, message):
    import time

    t = ChatTemplate(source, name="hostile", max_seconds=0.5)
    start = time.monotonic()
    with pytest.raises(ValueError) as e:
        t.render(CONVERSATION)
    assert time.monotonic() - start < 5
    assert str(e.value).startswith("chat template 'hostile' ") and message in str(e.value)


def test_a_template_too_large_or_too_deep_to_compile():
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% if 1 %}" * 3000 + "{% endif %}" * 3000)


def test_limits_leave_a_tracer_alone_and_restore_none():
    import sys

    t = ChatTemplate(CHATML_TEMPLATE)
    before = sys.gettrace()  # None, or coverage's / a debugger's tracer, which must survive
    t.render(CONVERSATION)
    assert sys.gettrace() is before
