"""Every bad input gets a 4xx / 429 with an OpenAI- (or Ollama-) shaped error object, and the server answers a good
request right after."""

from __future__ import annotations

import httpx
import pytest

from npulm.chat import ChatTemplate

openai = pytest.importorskip("openai")

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 4}


def post(server, path: str, **kw) -> httpx.Response:
    return httpx.post(server.url + path, timeout=60, **kw)


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    return err


@pytest.fixture
def after(server):
    """Checks after each test that the server still answers a good request."""
    yield
    r = post(server, "/v1/chat/completions", json=GOOD)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_malformed_json(server, after):
    err = error_of(post(server, "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                        headers={"content-type": "application/json"}), 400)
    assert "JSON" in err["message"]
    error_of(post(server, "/v1/completions", json=[1, 2]), 400)


def test_unknown_model(server, after):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=GOOD["messages"])
    assert "gpt-4o" in str(e.value)


def test_missing_or_bad_messages(server, after):
    assert error_of(post(server, "/v1/chat/completions", json={"model": "tiny"}), 400)["param"] == "messages"
    error_of(post(server, "/v1/chat/completions", json={"model": "tiny", "messages": []}), 400)
    error_of(post(server, "/v1/chat/completions", json={"model": "tiny", "messages": [{"content": "x"}]}), 400)
    error_of(post(server, "/v1/completions", json={"model": "tiny"}), 400)


def test_prompt_longer_than_context(server, after):
    long = "the cat " * 400
    err = error_of(post(server, "/v1/completions", json={"model": "tiny", "prompt": long}), 400)
    assert err["code"] == "context_length_exceeded"
    err = error_of(post(server, "/v1/chat/completions",
                        json={**GOOD, "messages": [{"role": "user", "content": long}]}), 400)
    assert err["code"] == "context_length_exceeded"
    r = httpx.post(server.url + "/api/generate", json={"model": "tiny", "prompt": long, "stream": False})
    assert r.status_code == 400 and "context" in r.json()["error"]


@pytest.mark.parametrize("value", [-1, 0, 10**9, "many", 2.5])
def test_bad_max_tokens(server, after, value):
    err = error_of(post(server, "/v1/chat/completions", json={**GOOD, "max_tokens": value}), 400)
    assert err["param"] == "max_tokens"


@pytest.mark.parametrize("field,value", [("temperature", -1), ("top_p", 2), ("n", 2), ("stop", 5),
                                         ("top_logprobs", 3), ("stream", "yes"), ("logit_bias", {"x": 1}),
                                         ("tools", [{"type": "function"}]), ("tools", {"f": 1}),
                                         ("tool_choice", "sometimes")])
def test_bad_fields(server, after, field, value):
    assert error_of(post(server, "/v1/chat/completions", json={**GOOD, field: value}), 400)["param"] == field


def test_oversized_body(server, after):
    big = {**GOOD, "messages": [{"role": "user", "content": "x" * (server.state.max_body + 10)}]}
    error_of(post(server, "/v1/chat/completions", json=big), 413)
    r = httpx.post(server.url + "/api/chat", json={**big, "stream": False}, timeout=60)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_chat_template_that_fails(server, after):
    llm = server.state.llm
    saved = llm._chat_template
    llm._chat_template = ChatTemplate("{% if messages[0]['role'] != 'system' %}"
                                      "{{ raise_exception('the first message must be a system message') }}"
                                      "{% endif %}{{ messages[0]['content'] }}", name="strict")
    try:
        err = error_of(post(server, "/v1/chat/completions", json=GOOD), 400)
        assert "system message" in err["message"] and err["code"] == "chat_template_error"
        r = httpx.post(server.url + "/api/chat", json={**GOOD, "stream": False}, timeout=60)
        assert r.status_code == 400 and "system message" in r.json()["error"]
    finally:
        llm._chat_template = saved


def test_too_many_queued_requests(server, after):
    engine = server.state.engine
    saved, engine.max_queue = engine.max_queue, 0  # every slot counts as full: the next request has to queue
    try:
        err = error_of(post(server, "/v1/chat/completions", json=GOOD), 429)
        assert err["code"] == "queue_full"
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            c.chat.completions.create(**GOOD)
    finally:
        engine.max_queue = saved


def test_unknown_route_and_method(server, after):
    assert httpx.get(server.url + "/v1/nothing").status_code == 404
    assert httpx.get(server.url + "/v1/chat/completions").status_code == 405


def test_context_is_shared_by_the_slots(server, tiny_models):
    """-c is the total over the slots (llama-server's rule); -c 0 shares the model's trained context."""
    from npulm.server import slot_context

    assert server.state.n_ctx == 256 and server.state.engine.n_ctx == 256  # the fixture's -c 1024 over 4 slots
    assert slot_context(str(tiny_models["llama"]), 1000, 4) == 250
    assert slot_context(str(tiny_models["llama"]), 0, 2) == server.state.llm.metadata["llama.context_length"] // 2
    with pytest.raises(ValueError, match="-c 3 cannot be shared by 4 slots"):
        slot_context(str(tiny_models["llama"]), 3, 4)
