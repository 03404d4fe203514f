"""The server through the official `ollama` client, unmodified."""

from __future__ import annotations

import pytest

ollama = pytest.importorskip("ollama")

OPTIONS = {"temperature": 0, "num_predict": 10}


def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=60)


def test_generate_plain_and_streamed_agree(server):
    c = client(server)
    r = c.generate(model="tiny", prompt="the cat", options=OPTIONS, stream=False)
    assert r.done and r.done_reason in ("stop", "length") and r.response
    assert r.eval_count <= 10 and r.prompt_eval_count > 0
    parts = list(c.generate(model="tiny", prompt="the cat", options=OPTIONS, stream=True))
    assert "".join(p.response for p in parts) == r.response
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == r.eval_count
    # raw: the prompt as is, and `context` continues it
    raw = c.generate(model="tiny", prompt="the cat", raw=True, options=OPTIONS, stream=False)
    assert raw.context[:len(server.state.llm.tokenize("the cat"))] == server.state.llm.tokenize("the cat")


def test_chat_plain_and_streamed_agree(server):
    c = client(server)
    messages = [{"role": "user", "content": "the hat"}]
    r = c.chat(model="tiny", messages=messages, options=OPTIONS, stream=False)
    assert r.message.role == "assistant" and r.message.content and r.done
    parts = list(c.chat(model="tiny", messages=messages, options=OPTIONS, stream=True))
    assert "".join(p.message.content for p in parts) == r.message.content and parts[-1].done


def test_options_seed_stop_logprobs(server):
    c = client(server)
    sampled = {"temperature": 1.5, "top_k": 0, "top_p": 1.0, "num_predict": 12}
    a = c.generate(model="tiny", prompt="the", options={**sampled, "seed": 3}, stream=False).response
    assert a == c.generate(model="tiny", prompt="the", options={**sampled, "seed": 3}, stream=False).response
    full = c.generate(model="tiny", prompt="the cat", options={**OPTIONS, "num_predict": 20}, stream=False).response
    stop = full[4:6]
    cut = c.generate(model="tiny", prompt="the cat", options={**OPTIONS, "num_predict": 20, "stop": [stop]},
                     stream=False)
    assert cut.response == full[:full.index(stop)] and cut.done_reason == "stop"
    r = c.chat(model="tiny", messages=[{"role": "user", "content": "a"}], options=OPTIONS, stream=False,
               logprobs=True, top_logprobs=2)
    assert len(r.logprobs) == r.eval_count and all(len(x.top_logprobs) == 2 for x in r.logprobs)


def test_model_information(server):
    c = client(server)
    (m,) = c.list().models
    assert m.model == "tiny" and m.details.format == "gguf" and m.details.family == "llama" and m.size > 0
    show = c.show("tiny")
    assert show.modelinfo["general.architecture"] == "llama" and "im_start" in show.template
    (p,) = c.ps().models
    assert p.model == "tiny" and p.context_length == server.state.n_ctx
    import httpx

    assert httpx.get(server.url + "/api/version").json()["version"]


def test_unknown_model_and_missing_messages(server):
    c = client(server)
    with pytest.raises(ollama.ResponseError) as e:
        c.generate(model="llama3:8b", prompt="hi", stream=False)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(server).show("nope")
    assert e.value.status_code == 404
    import httpx

    r = httpx.post(server.url + "/api/chat", json={"model": "tiny"})
    assert r.status_code == 400 and "messages" in r.json()["error"]
    assert c.generate(model="tiny", prompt="the", options=OPTIONS, stream=False).done


def test_embed(server):
    import numpy as np

    r = client(server).embed(model="tiny", input=["the cat", "a hat"])
    assert len(r.embeddings) == 2 and abs(np.linalg.norm(r.embeddings[0]) - 1) < 1e-5
    one = client(server).embeddings(model="tiny", prompt="the cat").embedding
    np.testing.assert_allclose(one, r.embeddings[0], atol=1e-6)


def test_format_schema(server):
    import json

    schema = {"type": "string", "enum": ["yes", "no"]}
    r = client(server).generate(model="tiny", prompt="the cat", format=schema, stream=False,
                                options={"num_predict": 20, "temperature": 0.8, "seed": 2})
    assert json.loads(r.response) in ("yes", "no")


def test_auth(keyed_server):
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=keyed_server.url).list()
    assert e.value.status_code == 401
    c = ollama.Client(host=keyed_server.url, headers={"Authorization": "Bearer sesame"})
    assert c.list().models[0].model == "tiny"
    assert c.generate(model="tiny", prompt="the", options=OPTIONS, stream=False).done


def test_chat_with_tools(tool_server, weather_tools):
    """`tools` reach the model through the prompt; the reply comes whole (streamed or not), with Ollama's
    tool_calls (arguments as objects) when the text holds a call, and a call goes back into the history."""
    from npulm.server.ollama_routes import ollama_message
    from npulm.tools import ToolUse

    c = client(tool_server)
    messages = [{"role": "user", "content": "add one"}]
    plain = c.chat(model="tiny", messages=messages, options=OPTIONS, stream=False)
    r = c.chat(model="tiny", messages=messages, tools=weather_tools, options=OPTIONS, stream=False)
    assert r.done and r.message.role == "assistant" and r.prompt_eval_count > plain.prompt_eval_count
    parts = list(c.chat(model="tiny", messages=messages, tools=weather_tools, options=OPTIONS, stream=True))
    assert len(parts) == 1 and parts[0].done and parts[0].message.content == r.message.content

    use = ToolUse(messages, weather_tools, None, tool_server.state.llm.chat_template.source)
    msg = ollama_message(use, '<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>', "stop")
    assert msg["tool_calls"] == [{"function": {"name": "add", "arguments": {"a": 1}}}]
    assert ollama.Message(**msg).tool_calls[0].function.arguments == {"a": 1}  # the client's own model
    follow = messages + [msg, {"role": "tool", "content": "2"}]
    assert c.chat(model="tiny", messages=follow, tools=weather_tools, options=OPTIONS, stream=False).done
    with pytest.raises(ollama.ResponseError):
        c.chat(model="tiny", messages=messages, tools=[{"type": "function"}], stream=False)
