"""The server through the official `openai` client, unmodified: completions and chat, streamed and not, logprobs,
usage, auth; batching gives each request the tokens it gets alone."""

from __future__ import annotations

import concurrent.futures as cf
import math

import httpx
import pytest

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "user", "content": "the cat in the hat"}]


def client(server, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_models(server):
    (m,) = client(server).models.list().data
    assert m.id == "tiny" and m.owned_by == "npulm"


def test_completion_plain_and_streamed_agree(server):
    c = client(server)
    r = c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason in ("length", "stop") and choice.text
    assert r.usage.prompt_tokens == len(server.state.llm.tokenize("the cat"))
    assert r.usage.completion_tokens == 12 or choice.finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(c.completions.create(model="tiny", prompt="the cat", max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_logprobs(server):
    r = client(server).completions.create(model="tiny", prompt="the cat", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == r.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and len(top) == 3
        assert math.isclose(max(top.values()), value, abs_tol=1e-9)  # greedy: the chosen token is the most likely
        assert token in top


def test_chat_plain_and_streamed_with_usage(server):
    c = client(server)
    r = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.completion_tokens <= 10 and r.usage.prompt_tokens > 5
    stream = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == msg.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
    # without include_usage no chunk carries usage
    assert all(ch.usage is None for ch in c.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=3, temperature=0, stream=True))


def test_sse_ends_with_done(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": MESSAGES, "max_tokens": 3, "stream": True}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and r.headers["content-type"].startswith("text/event-stream")


def test_chat_logprobs(server):
    r = client(server).chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5, temperature=0,
                                               logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    assert "".join(e.token for e in content).strip() == r.choices[0].message.content.strip()
    for e in content:
        assert len(e.top_logprobs) == 2 and math.isclose(e.top_logprobs[0].logprob, e.logprob, abs_tol=1e-9)
        assert bytes(e.bytes).decode() == e.token


def test_seed_makes_sampling_repeatable(server):
    c = client(server)

    def once(seed):
        return c.completions.create(model="tiny", prompt="the", max_tokens=16, temperature=1.5,
                                    extra_body={"min_p": 0, "top_k": 0}, seed=seed).choices[0].text
    assert once(7) == once(7)
    assert len({once(s) for s in range(4)}) > 1


def test_stop_string(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0).choices[0].text
    stop = full[5:7]
    r = c.completions.create(model="tiny", prompt="the cat", max_tokens=20, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"


def test_prefix_cache_reuses_the_history(server):
    c = client(server)
    first = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    turn2 = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "and the hat"}]
    r = c.chat.completions.create(model="tiny", messages=turn2, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    again = c.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == first.choices[0].message.content


def test_concurrent_greedy_equals_one_at_a_time(server):
    """8 requests at once share batched steps (prefill chunks and decode rows mixed): each gets its solo tokens."""
    c = client(server)
    prompts = ["the cat", "a hat in", "the the the", "in on er", "zebra", "the th t", "on a he", "bcd efg hij"]

    def run(p):
        r = c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, logprobs=0)
        return r.choices[0].logprobs.tokens

    alone = [run(p) for p in prompts]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, prompts))
    assert together == alone


def test_disconnect_frees_the_slot(server):
    import time

    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"model": "tiny", "prompt": "the", "max_tokens": 60, "stream": True,
                            "temperature": 0, "ignore_eos": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 5
    while server.state.engine.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.state.engine.busy == 0


def test_auth(keyed_server):
    with pytest.raises(openai.AuthenticationError):
        client(keyed_server, "wrong").models.list()
    assert client(keyed_server, "sesame").models.list().data[0].id == "tiny"
    r = client(keyed_server, "sesame").chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=3)
    assert r.choices[0].message.content is not None
    assert httpx.get(keyed_server.url + "/health").status_code == 200
    assert httpx.get(keyed_server.url + "/metrics").status_code == 401
    assert httpx.get(keyed_server.url + "/metrics", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_auth_covers_the_page(keyed_server):
    """The page and its files need the key too; a browser gets a Basic challenge and may send the key as the
    password (any user name)."""
    for path in ("/", "/static/app.js", "/favicon.ico"):
        r = httpx.get(keyed_server.url + path)
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Basic"), path
        assert httpx.get(keyed_server.url + path, auth=("someone", "wrong")).status_code == 401
    assert httpx.get(keyed_server.url + "/", auth=("someone", "sesame")).status_code == 200
    assert "renderMarkdown" in httpx.get(keyed_server.url + "/static/app.js", auth=("", "sesame")).text
    assert httpx.get(keyed_server.url + "/v1/models", auth=("", "sesame")).status_code == 200
    r = httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": "Basic !!not-base64"})
    assert r.status_code == 401 and r.headers.get_list("www-authenticate")[1].startswith("Bearer")
    assert httpx.get(keyed_server.url + "/v1/models", headers={"Authorization": "Token sesame"}).status_code == 401


def test_metrics(server):
    client(server).completions.create(model="tiny", prompt="the", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in ("npulm_requests_total", "npulm_tokens_per_second", "npulm_queue_depth", "npulm_slots_busy",
                 "npulm_prefix_cache_hits_total", "npulm_generated_tokens_total",
                 "npulm_time_to_first_token_seconds_bucket"):
        assert name in text


def test_embeddings(server):
    """OpenAI's client asks for base64 by default; both encodings give the Python API's unit vectors."""
    import numpy as np

    c = client(server)
    r = c.embeddings.create(model="tiny", input=["the cat", "a hat"])
    assert [d.index for d in r.data] == [0, 1] and r.usage.prompt_tokens > 2
    v = np.array(r.data[0].embedding)
    assert abs(np.linalg.norm(v) - 1) < 1e-5
    plain = c.embeddings.create(model="tiny", input="the cat", encoding_format="float").data[0].embedding
    np.testing.assert_allclose(plain, v, atol=1e-6)
    ref = server.state.llm.create_embedding("the cat", pooling="mean")["data"][0]["embedding"]
    np.testing.assert_allclose(v, ref, atol=1e-5)
    assert len(c.embeddings.create(model="tiny", input="the cat", dimensions=8).data[0].embedding) == 8


def test_response_format_json_schema(server):
    import json

    schema = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
              "required": ["answer"]}
    r = client(server).chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=40, temperature=0.8, seed=1,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert json.loads(r.choices[0].message.content)["answer"] in ("yes", "no")
    with pytest.raises(openai.BadRequestError):
        client(server).chat.completions.create(model="tiny", messages=MESSAGES,
                                               response_format={"type": "xml"})


def test_tool_calls(tool_server, weather_tools):
    """tools / tool_choice through the model's template, OpenAI tool_calls back (plain and streamed), the same
    reply as the Python API's for a greedy request."""
    import json

    from npulm import Llama

    c = client(tool_server)
    msgs = [{"role": "user", "content": "weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = c.chat.completions.create(model="tiny", messages=msgs, tools=weather_tools, tool_choice=named, max_tokens=200,
                                  temperature=0)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Oslo")
    alone = Llama(tool_server.state.llm.model_path, n_ctx=2048, verbose=False).create_chat_completion(
        msgs, tools=weather_tools, tool_choice=named, max_tokens=200, temperature=0)["choices"][0]["message"]
    assert alone["tool_calls"][0]["function"] == {"name": call.function.name, "arguments": call.function.arguments}

    stream = c.chat.completions.create(model="tiny", messages=msgs, tools=weather_tools, tool_choice="required",
                                       max_tokens=200, temperature=0.7, seed=4, stream=True)
    chunks = list(stream)
    calls = [d.tool_calls for d in (ch.choices[0].delta for ch in chunks if ch.choices) if d.tool_calls]
    assert calls and calls[0][0].index == 0 and calls[0][0].function.name in ("get_weather", "add")
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"
    # the call goes back into the history with the tool's answer
    follow = msgs + [r.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "22 C"}]
    reply = c.chat.completions.create(model="tiny", messages=follow, tools=weather_tools, max_tokens=3)
    assert reply.choices[0].message
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        c.chat.completions.create(model="tiny", messages=msgs, tools=weather_tools,
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
