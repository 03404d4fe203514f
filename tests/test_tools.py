"""Tool-call parsing for the three common formats, tool_choice handling, and the grammar helpers they use."""

from __future__ import annotations

import json

import pytest

from npulm import tools
from npulm.grammar import LlamaGrammar, TokenizerAdapter, closed_objects
from npulm.tokenizer import Tokenizer

pytest.importorskip("llguidance")


def _call(reply, fmt="hermes", names=None):
    content, calls = tools.parse_tool_calls(reply, fmt, names)
    return content, [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls], calls


def test_hermes_qwen_tool_calls():
    reply = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    content, calls, raw = _call(reply)
    assert content == "Let me check." and calls == [("get_weather", {"city": "Paris"}), ("add", {"a": 1, "b": 2})]
    assert raw[0]["type"] == "function" and raw[0]["id"].startswith("call_") and raw[0]["id"] != raw[1]["id"]


def test_llama3_json_and_python_tag():
    assert _call('{"name": "add", "parameters": {"a": 1}}', "llama3")[1] == [("add", {"a": 1})]
    assert _call('<|python_tag|>{"type": "function", "name": "add", "parameters": {"a": 2}}', "llama3")[1] == \
        [("add", {"a": 2})]
    assert _call('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}')[1] == \
        [("a", {}), ("b", {"x": 1})]


def test_mistral_tool_calls():
    content, calls, _ = _call('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}, {"name": "mul", '
                              '"arguments": {"b": 2}}]', "mistral")
    assert content is None and calls == [("add", {"a": 1}), ("mul", {"b": 2})]


def test_plain_text_and_unknown_functions_stay_text():
    assert _call("The answer is {42}.")[1] == []
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    content, calls, _ = _call(text, names={"add"})
    assert calls == [] and content == text


def test_streaming_holds_back_only_what_may_be_a_call():
    assert tools.may_start_call("") and tools.may_start_call("  <tool") and tools.may_start_call("[TOOL_C")
    assert tools.may_start_call('{"na') and not tools.may_start_call("Hello")


def test_tool_choice_and_legacy_functions():
    tl = tools.normalize_tools(None, [{"name": "f", "parameters": {}}])
    assert tl == [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert tools.normalize_choice(None, None, tl) == "auto" and tools.normalize_choice(None, None, None) == "none"
    assert tools.normalize_choice(None, {"name": "f"}, tl)["function"]["name"] == "f"
    with pytest.raises(ValueError, match="needs tools"):
        tools.normalize_choice("required", None, None)
    with pytest.raises(ValueError, match="not among"):
        tools.normalize_choice({"type": "function", "function": {"name": "g"}}, None, tl)
    with pytest.raises(ValueError, match="not one of|is not none"):
        tools.normalize_choice("sometimes", None, tl)
    with pytest.raises(ValueError, match="either tools or functions"):
        tools.normalize_tools(tl, [{"name": "f"}])


def test_messages_for_template_turn_argument_strings_into_dicts():
    msgs = tools.messages_for_template([{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]}])
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == {"a": 1} and msgs[0]["content"] == ""
    prompt = tools.with_tool_prompt([{"role": "user", "content": "hi"}], tools.normalize_tools(
        [{"type": "function", "function": {"name": "f"}}], None))
    assert prompt[0]["role"] == "system" and "<tools>" in prompt[0]["content"]


def test_call_grammars_compile_for_every_format():
    tl = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "integer"}}}}}, {"type": "function", "function": {"name": "g"}}]
    for fmt in tools.FORMATS:
        assert tools.call_grammar(tl, "required", fmt)
        assert tools.call_grammar(tl, {"type": "function", "function": {"name": "g"}}, fmt)


def test_schema_objects_are_closed_as_llama_cpp_does():
    s = closed_objects({"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {}}}},
                        "anyOf": [{"properties": {"c": {}}}]})
    assert s["additionalProperties"] is False and s["properties"]["a"]["additionalProperties"] is False
    assert s["anyOf"][0]["additionalProperties"] is False
    assert closed_objects({"properties": {}, "additionalProperties": True})["additionalProperties"] is True


def test_llama_grammar_from_gbnf_and_schema():
    assert LlamaGrammar.from_string('root ::= "yes" | "no"').grammar
    assert LlamaGrammar.from_json_schema(json.dumps({"type": "object"})).grammar


def test_adapter_spells_text_exactly_on_a_space_prefixing_vocabulary(tiny_models):
    from npulm.gguf import GGUFFile

    tok = Tokenizer.from_gguf(GGUFFile(str(tiny_models["llama"])).kv)
    ad = TokenizerAdapter(tok, tok.vocab_size)
    for text in ("{", "the cat", ' "x": 1}', "\n"):
        assert b"".join(ad.tokens[i] for i in ad(text)) == text.encode()
