"""The llama-cpp-python-shaped API and the generation loop on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from npulm.api import Llama
from npulm.generate import ContextOverflow, StopStrings


@pytest.fixture(scope="module")
def llm(tiny_models):
    return Llama(str(tiny_models["llama"]), n_ctx=48, n_batch=5, seed=1, verbose=False)


def test_tokenize_detokenize(llm):
    toks = llm.tokenize(b"hello the world")
    assert toks[0] == llm.token_bos()
    assert llm.detokenize(toks[1:]).decode() == " hello the world"
    assert llm.tokenize("hi", add_bos=False)[0] != llm.token_bos()
    assert llm.tokenize("<|im_start|>", add_bos=False, special=True) == [3]
    assert 3 not in llm.tokenize("<|im_start|>", add_bos=False, special=False)


def test_eval_scores_match_one_shot_forward(tiny_models):
    a = Llama(str(tiny_models["llama"]), n_ctx=32, n_batch=3, logits_all=True, verbose=False)
    toks = a.tokenize("the cat sat on the mat")
    a.eval(toks[:4])
    a.eval(toks[4:])
    assert a.n_tokens == len(toks)
    b = Llama(str(tiny_models["llama"]), n_ctx=32, n_batch=512, logits_all=True, verbose=False)
    b.eval(toks)
    want = b.scores[:len(toks)]  # batch sizes change summation order, and 8-bit activations can round either way
    np.testing.assert_allclose(a.scores[:len(toks)], want, rtol=0, atol=1e-4 * np.abs(want).max())


def test_completion_shape_and_greedy_determinism(llm):
    out = llm("the", max_tokens=6, temperature=0)
    assert out["object"] == "text_completion"
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 6
    assert llm("the", max_tokens=6, temperature=0)["choices"][0]["text"] == choice["text"]
    streamed = "".join(c["choices"][0]["text"] for c in llm("the", max_tokens=6, temperature=0, stream=True))
    assert streamed == choice["text"]


def test_seeded_sampling_reproducible(llm):
    a = llm("in", max_tokens=8, temperature=1.0, seed=42)["choices"][0]["text"]
    b = llm("in", max_tokens=8, temperature=1.0, seed=42)["choices"][0]["text"]
    assert a == b


def test_stop_strings(llm):
    text = llm("the", max_tokens=12, temperature=0)["choices"][0]["text"]
    cut = text[3:5]
    out = llm("the", max_tokens=12, temperature=0, stop=[cut])["choices"][0]
    assert out["finish_reason"] == "stop" and out["text"] == text[:text.find(cut)]
    s = StopStrings(["END"])
    assert s.feed("abcE") == "abc" and s.feed("N") == "" and s.feed("D more") == "" and s.hit


def test_context_overflow_is_a_clear_error(llm):
    with pytest.raises(ContextOverflow, match="exceed context window of 48"):
        llm("a " * 100, max_tokens=4)


def test_generation_stops_at_full_context(tiny_models):
    small = Llama(str(tiny_models["llama"]), n_ctx=12, verbose=False)
    out = small("the", max_tokens=100, temperature=0)
    assert out["choices"][0]["finish_reason"] == "length" and small.n_tokens == 12


def test_chat_completion(llm):
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.create_chat_completion(msgs, max_tokens=4, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion(msgs, max_tokens=4, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == \
        out["choices"][0]["message"]["content"]
    toks = llm.apply_chat_template(msgs)
    assert toks[:2] == [llm.token_bos(), 3]  # BOS, then <|im_start|> parsed as a special token


def test_concurrent_calls_are_serialized_not_corrupted(tiny_models):
    """One Llama from several threads: each call gets what it would alone."""
    from concurrent.futures import ThreadPoolExecutor

    llm = Llama(str(tiny_models["llama"]), n_ctx=48, verbose=False)
    prompts = ["the", "in a", "he is", "on the", "a cat", "the er"]
    alone = [llm(p, max_tokens=10, temperature=0)["choices"][0]["text"] for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: llm(p, max_tokens=10, temperature=0)["choices"][0]["text"], prompts * 2))
    assert together == alone * 2


def test_unfinished_stream_in_the_same_thread_is_an_error(llm):
    stream = llm("the", max_tokens=4, temperature=0, stream=True)
    next(stream)
    with pytest.raises(RuntimeError, match="already generating"):
        llm("in", max_tokens=2)
    stream.close()
    assert llm("in", max_tokens=2, temperature=0)["usage"]["completion_tokens"] == 2


def test_eval_while_own_stream_is_open_is_an_error_not_a_deadlock(llm):
    stream = llm("the", max_tokens=4, temperature=0, stream=True)
    next(stream)
    for call in (lambda: llm.eval([5]), llm.reset, llm.save_state):
        with pytest.raises(RuntimeError, match="already generating"):
            call()
    stream.close()
    llm.reset()
