"""The llama-cpp-python drop-in surface on a tiny model: keywords implemented or refused by name, logprobs, logit
bias, grammar-constrained output, tool calls, embeddings, state."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from npulm import compat
from npulm.api import Llama, log_softmax

pytest.importorskip("llguidance")


@pytest.fixture(scope="module")
def llm(tiny_models):
    return Llama(str(tiny_models["llama"]), n_ctx=96, seed=1, verbose=False)


def test_unknown_keywords_raise_typeerror_with_a_hint(tiny_models, llm):
    with pytest.raises(TypeError, match="n_npu_layer'.*did you mean 'n_npu_layers'|n_npu_layer"):
        Llama(str(tiny_models["llama"]), n_npu_layer=4, verbose=False)
    with pytest.raises(TypeError, match="temprature"):
        llm("the", temprature=0.5)
    with pytest.raises(TypeError, match="bogus"):
        llm.create_chat_completion([{"role": "user", "content": "hi"}], bogus=1)


def test_refused_keywords_name_themselves_unless_default(tiny_models, llm):
    with pytest.raises(compat.UnsupportedArgument, match="lora_path"):
        Llama(str(tiny_models["llama"]), lora_path="x.gguf", verbose=False)
    with pytest.raises(compat.UnsupportedArgument, match="suffix"):
        llm("the", suffix="end")
    with pytest.raises(compat.UnsupportedArgument, match="tfs_z"):
        llm("the", tfs_z=0.9)
    assert llm("the", max_tokens=2, tfs_z=1.0, suffix=None)["choices"]  # defaults pass
    Llama(str(tiny_models["llama"]), use_mmap=True, type_k=None, verbose=False)


def test_accepted_without_effect_warns_once(tiny_models):
    compat._warned.discard("flash_attn")
    with pytest.warns(UserWarning, match="flash_attn"):
        Llama(str(tiny_models["llama"]), flash_attn=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Llama(str(tiny_models["llama"]), flash_attn=True, verbose=False)


def test_n_gpu_layers_without_a_board_is_ignored_with_a_warning(tiny_models, monkeypatch):
    monkeypatch.delenv("NPULM_NPU_RUNTIME", raising=False)
    with pytest.warns(UserWarning, match="n_gpu_layers=-1 is ignored"):
        m = Llama(str(tiny_models["llama"]), n_gpu_layers=-1, verbose=False)
    assert not m.placement.npu_layers
    assert Llama._npu_layers(0, 2) == 2
    with pytest.raises(ValueError, match="disagree"):
        Llama._npu_layers(3, 2)


def test_bad_sampling_values_rejected_by_name(llm):
    for kw, name in ((dict(top_k=-1), "top_k"), (dict(top_p=2.0), "top_p"), (dict(temperature=float("nan")),
                     "temperature"), (dict(repeat_penalty=0), "repeat_penalty"), (dict(logit_bias={10**6: 1}),
                                                                                  "logit_bias")):
        with pytest.raises(ValueError, match=name):
            llm("the", max_tokens=2, **kw)


def test_logprobs_are_the_log_softmax_of_eval_logits(tiny_models):
    a = Llama(str(tiny_models["llama"]), n_ctx=64, verbose=False)
    out = a("the cat", max_tokens=5, temperature=0, logprobs=3)
    lp = out["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(lp["tokens"]) == 5 and all(len(t) == 3 for t in lp["top_logprobs"])
    ref = Llama(str(tiny_models["llama"]), n_ctx=64, logits_all=True, verbose=False)
    prompt = ref.tokenize("the cat")
    generated = a.input_ids[len(prompt):].tolist()  # the last token is sampled, never evaluated (llama-cpp-python too)
    ref.eval(prompt + generated)
    generated.append(int(np.argmax(ref.scores[len(prompt) + 3])))  # greedy
    want = log_softmax(ref.scores[len(prompt) - 1:len(prompt) + 4])
    got = np.array(lp["token_logprobs"])
    np.testing.assert_allclose(got, want[np.arange(5), generated], atol=2e-3)
    assert max(lp["top_logprobs"][0].values()) == pytest.approx(lp["token_logprobs"][0], abs=1e-5)  # greedy
    chat = a.create_chat_completion([{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True,
                                    top_logprobs=2)
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"] and len(content[0]["top_logprobs"]) == 2
    assert set(content[0]) == {"token", "logprob", "bytes", "top_logprobs"}


def test_logit_bias_minus_100_bans_the_token(tiny_models):
    a = Llama(str(tiny_models["llama"]), n_ctx=64, verbose=False)
    a.eval(a.tokenize("the"))
    best = int(np.argmax(a.scores[0]))
    lp = a("the", max_tokens=1, temperature=0, logprobs=2, logit_bias={str(best): -100})["choices"][0]["logprobs"]
    # logprobs come from the model's logits (before the bias): the banned best token tops them, the pick is another
    assert lp["token_logprobs"][0] < max(lp["top_logprobs"][0].values()) - 1e-6
    s = a._sampler(dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias={best: -100}))
    assert best not in {s(a.scores[0], []) for _ in range(300)}


SCHEMA = {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}, "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 1, "maximum": 9}},
          "required": ["kind", "ok", "n"], "additionalProperties": False}


def test_response_format_and_grammar_constrain_a_random_model(llm):
    jsonschema = pytest.importorskip("jsonschema")
    for seed in range(3):
        out = llm.create_chat_completion([{"role": "user", "content": "json"}], seed=seed, temperature=1.0,
                                         max_tokens=80, response_format={"type": "json_object", "schema": SCHEMA})
        jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)
    out = llm.create_chat_completion([{"role": "user", "content": "json"}], temperature=0, max_tokens=80,
                                     response_format={"type": "json_schema", "json_schema": {"name": "x",
                                                                                             "schema": SCHEMA}})
    jsonschema.validate(json.loads(out["choices"][0]["message"]["content"]), SCHEMA)
    text = llm("say", grammar='root ::= "yes" | "no"', max_tokens=10, temperature=1.0)["choices"][0]["text"]
    assert text in ("yes", "no")
    with pytest.raises(ValueError, match="one of grammar"):
        llm.create_chat_completion([{"role": "user", "content": "x"}], grammar='root ::= "a"',
                                   response_format={"type": "json_object"})


def test_tool_choice_named_and_required_give_openai_tool_calls(tiny_models, weather_tools):
    llm = Llama(str(tiny_models["llama"]), n_ctx=2048, seed=1, verbose=False)  # the tool prompt, letter by letter
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    out = llm.create_chat_completion(msgs, tools=weather_tools, max_tokens=200, temperature=0.7, seed=3,
                                     tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"])["city"] in ("Paris", "Oslo")
    out = llm.create_chat_completion(msgs, tools=weather_tools, tool_choice="required", max_tokens=200, temperature=0.7,
                                     seed=4)
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] in ("get_weather", "add")
    chunks = list(llm.create_chat_completion(msgs, tools=weather_tools, tool_choice="required", max_tokens=200,
                                             temperature=0.7, seed=4, stream=True))
    calls = [c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]]
    assert calls and calls[0][0]["index"] == 0 and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    follow = msgs + [out["choices"][0]["message"], {"role": "tool", "tool_call_id": "x", "content": "22 C"}]
    assert llm.create_chat_completion(follow, tools=weather_tools, max_tokens=3)["choices"][0]["message"]["role"]
    with pytest.raises(ValueError, match="not among the tools"):
        llm.create_chat_completion(msgs, tools=weather_tools,
                                   tool_choice={"type": "function", "function": {"name": "nope"}})


def test_embeddings_pool_as_asked_and_normalize(llm):
    tokens = llm.tokenize("the cat")
    per_token = llm.embed("the cat")  # the tiny GGUF declares no pooling: one vector per token, as llama.cpp
    assert np.asarray(per_token).shape == (len(tokens), llm.n_embd())
    mean = np.asarray(llm.embed("the cat", pooling="mean"))
    np.testing.assert_allclose(mean, np.mean(per_token, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(llm.embed("the cat", pooling="last"), per_token[-1], rtol=1e-6)
    np.testing.assert_allclose(llm.embed("the cat", pooling="cls"), per_token[0], rtol=1e-6)
    out = llm.create_embedding(["the cat", "a dog"], pooling="mean")
    assert [d["index"] for d in out["data"]] == [0, 1] and out["usage"]["prompt_tokens"] > 0
    assert np.linalg.norm(out["data"][0]["embedding"]) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(out["data"][0]["embedding"], mean / np.linalg.norm(mean), atol=1e-5)


def test_save_and_load_state_replay_a_generation(tiny_models):
    a = Llama(str(tiny_models["llama"]), n_ctx=64, seed=5, verbose=False)
    a.eval(a.tokenize("the cat sat"))
    state = a.save_state()
    first = [a.sample(temp=1.0) for _ in range(1)] + list(_take(a.generate([], temp=1.0, reset=False), 4))
    a.load_state(state)
    assert a.n_tokens == state.n_tokens
    again = [a.sample(temp=1.0) for _ in range(1)] + list(_take(a.generate([], temp=1.0, reset=False), 4))
    assert first == again


def test_an_open_generator_is_a_clear_error_not_a_deadlock(tiny_models):
    a = Llama(str(tiny_models["llama"]), n_ctx=64, verbose=False)
    g = a.generate(a.tokenize("the"), temp=0)
    next(g)
    with pytest.raises(RuntimeError, match="already generating"):
        a("x", max_tokens=2)
    g.close()
    assert a("x", max_tokens=2)["choices"]


def _take(it, n):
    for i, x in enumerate(it):
        if i >= n:
            return
        yield x


def test_close_context_manager_and_set_seed(tiny_models):
    with Llama(str(tiny_models["llama"]), n_ctx=64, verbose=False) as m:
        m.set_seed(11)
        a = m("in", max_tokens=6, temperature=1.0)["choices"][0]["text"]
        m.set_seed(11)
        assert m("in", max_tokens=6, temperature=1.0)["choices"][0]["text"] == a
    with pytest.raises(RuntimeError, match="closed"):
        m("in", max_tokens=2)


def test_chat_format_choices(tiny_models):
    m = Llama(str(tiny_models["llama"]), chat_format="chatml", verbose=False)
    assert m.chat_template.name == "chatml"
    with pytest.raises(compat.UnsupportedArgument, match="chat_format"):
        Llama(str(tiny_models["llama"]), chat_format="vicuna", verbose=False)


def test_stopping_criteria_and_logits_processor(llm):
    def only_a(input_ids, scores):
        out = np.full_like(scores, -np.inf)
        out[llm.tokenize("a", add_bos=False)[-1]] = 0.0
        return out

    text = llm("the", max_tokens=5, temperature=0, logits_processor=[only_a])["choices"][0]["text"]
    assert set(text.replace(" ", "")) <= {"a"}
    out = llm("the", max_tokens=10, temperature=0, stopping_criteria=[lambda ids, logits: True])
    assert out["usage"]["completion_tokens"] == 1 and out["choices"][0]["finish_reason"] == "stop"


def test_readme_table_is_generated_from_the_compat_tables():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert compat.markdown() in readme, "README's llama-cpp-python table is stale: python -m npulm.compat"
