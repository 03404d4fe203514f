"""OpenAI's API: /v1/models, /v1/completions, /v1/chat/completions (SSE streams ending with `data: [DONE]`), with
llama-server's extra sampling fields (top_k, min_p, repeat_penalty) accepted as well."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import tools
from .app import (
    ApiError,
    ServerState,
    collect,
    field_of,
    generate,
    handles,
    message_list,
    openai_error,
    read_json,
    sampling_fields,
)
from .app import stop_list as _stop_list
from .engine import DoneEvent, GenRequest, TokenEvent


def grammar_of(body: dict) -> str | None:
    """response_format (OpenAI), or llama-server's `grammar` (GBNF) / `json_schema`, as a grammar (npulm.grammar)."""
    from ..grammar import as_grammar, json_schema_grammar, response_format_grammar

    given = [k for k in ("response_format", "grammar", "json_schema") if body.get(k) is not None]
    if len(given) > 1:
        raise ApiError(400, f"give one of {', '.join(given)}", given[1])
    try:
        if body.get("grammar") is not None:
            return as_grammar(field_of(body, "grammar", str))
        if body.get("json_schema") is not None:
            return json_schema_grammar(body["json_schema"])
        return response_format_grammar(body.get("response_format"))
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e), given[0] if given else None) from None


async def _request(state: ServerState, body: dict, prompt: list[int], logprobs: int | None,
                   tool_grammar: str | None = None) -> GenRequest:
    """The sampling fields both endpoints share, checked; defaults are llama-server's. tool_grammar: the constraint
    of a required / named tool_choice."""
    if field_of(body, "n", int, 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    max_tokens = field_of(body, "max_completion_tokens", int, None, lo=1)
    if max_tokens is None:
        max_tokens = field_of(body, "max_tokens", int, None, lo=1)
    state.check_length(prompt, max_tokens)
    params = sampling_fields(body, SAMPLING, {"temperature": 0.8, "top_p": 0.95, "min_p": 0.05, "top_k": 40})
    bias = body.get("logit_bias")
    if bias is not None:
        try:
            params["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (AttributeError, TypeError, ValueError):
            raise ApiError(400, "'logit_bias' must map token ids to numbers", "logit_bias") from None
    if not 0 <= params["temperature"] <= 2:
        raise ApiError(400, f"'temperature' must be in [0, 2], got {params['temperature']}", "temperature")
    grammar = grammar_of(body)
    if grammar is not None and tool_grammar is not None:
        raise ApiError(400, "give one of response_format / grammar and a required or named tool_choice", "tool_choice")
    grammar = tool_grammar if grammar is None else grammar
    lltok = await state.grammar_tokenizer() if grammar is not None else None
    sampler = state.sampler(params, grammar=grammar, lltok=lltok)
    return GenRequest(prompt, sampler, max_tokens, _stop_list(body.get("stop")), logprobs,
                      ignore_eos=field_of(body, "ignore_eos", bool, False))


# OpenAI's fields and llama-server's extra ones -> SamplingParams
SAMPLING = {k: k for k in ("temperature", "top_p", "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                           "frequency_penalty", "presence_penalty", "seed", "mirostat_tau", "mirostat_eta",
                           "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n")}
SAMPLING["mirostat"] = "mirostat_mode"


def _usage(done: DoneEvent) -> dict:
    return {"prompt_tokens": done.n_prompt, "completion_tokens": done.n_gen,
            "total_tokens": done.n_prompt + done.n_gen, "prompt_tokens_details": {"cached_tokens": done.n_cached}}


def _timings(done: DoneEvent) -> dict:
    """llama-server's timings (the web page shows tokens/s from them)."""
    gen_ms = done.t_gen * 1e3
    return {"prompt_n": done.n_prompt - done.n_cached, "prompt_ms": done.t_prompt * 1e3, "cache_n": done.n_cached,
            "predicted_n": done.n_gen, "predicted_ms": gen_ms,
            "predicted_per_second": (done.n_gen - 1) / done.t_gen if done.t_gen > 0 else 0.0}


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    return bool(field_of(options, "include_usage", bool, False, where="stream_options."))


def _sse(chunks: AsyncIterator[dict], req: GenRequest) -> EventSourceResponse:
    """An SSE reply; its end (a disconnect included) cancels the generation."""
    async def events():
        try:
            async for chunk in chunks:
                yield {"data": json.dumps(chunk, ensure_ascii=False)}
        except ApiError as e:  # after the 200 header: the error travels as an event, as OpenAI does
            yield {"data": json.dumps({"error": {"message": e.message, "type": e.type, "code": e.code}})}
        finally:
            req.cancel()
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, sep="\n")


# --- /v1/models ------------------------------------------------------------------------------------------------
async def models(request: Request) -> Response:
    state: ServerState = request.app.state.npulm
    return JSONResponse({"object": "list", "data": [
        {"id": state.name, "object": "model", "created": int(state.started), "owned_by": "npulm",
         "meta": {"n_ctx": state.n_ctx, "n_vocab": state.llm.n_vocab(), "slots": len(state.engine.slots)}}]})


# --- /v1/completions -------------------------------------------------------------------------------------------
def _completion_prompt(state: ServerState, prompt: Any) -> tuple[list[int], str]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return state.llm.tokenize(prompt), prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < state.llm.n_vocab()]
        if bad:
            raise ApiError(400, f"token id {bad[0]} out of range 0..{state.llm.n_vocab() - 1}", "prompt")
        return prompt, ""
    if prompt is None:
        raise ApiError(400, "'prompt' is required", "prompt")
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", "prompt")


def _completion_logprobs(state: ServerState, events: list[TokenEvent], offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for e in events:
        tokens.append(state.token_text(e.token))
        token_lps.append(e.logprob)
        tops.append({state.token_text(t): lp for t, lp in e.top or []})
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@handles(openai_error)
async def completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.max_body)
    state.check_model(body.get("model"))
    prompt, prompt_text = _completion_prompt(state, body.get("prompt"))
    logprobs = field_of(body, "logprobs", int, None, lo=0, hi=20)
    req = await _request(state, body, prompt, logprobs)
    echo = field_of(body, "echo", bool, False)
    head = prompt_text if echo else ""
    cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())

    def chunk(text: str, reason: str | None, events: list[TokenEvent], offset: int) -> dict:
        lps = _completion_logprobs(state, events, offset) if logprobs is not None else None
        return {"id": cid, "object": "text_completion", "created": created, "model": state.name,
                "choices": [{"text": text, "index": 0, "logprobs": lps, "finish_reason": reason}]}

    if field_of(body, "stream", bool, False):
        include_usage = _stream_options(body)

        events = generate(state, req)

        async def chunks():
            offset = len(head)
            if head:
                yield chunk(head, None, [], 0)
            async for e in events:
                if isinstance(e, TokenEvent):
                    if e.text or logprobs is not None:
                        yield chunk(e.text, None, [e], offset)
                        offset += len(e.text)
                else:
                    last = chunk(e.text, e.reason, [], offset)
                    last["timings"] = _timings(e)
                    if include_usage:
                        last["usage"] = _usage(e)
                    yield last
        return _sse(chunks(), req)
    events = await collect(request, state, req)
    done = events[-1]
    tokens = events[:-1]
    out = chunk(head + "".join(e.text for e in tokens) + done.text, done.reason, tokens, len(head))
    out["usage"], out["timings"] = _usage(done), _timings(done)
    return JSONResponse(out)


# --- /v1/chat/completions --------------------------------------------------------------------------------------
def _chat_logprob(state: ServerState, e: TokenEvent) -> dict:
    def entry(token: int, lp: float) -> dict:
        text = state.token_text(token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}
    return {**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top or []]}


@handles(openai_error)
async def chat_completions(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.max_body)
    state.check_model(body.get("model"))
    messages = message_list(body.get("messages"))
    use = state.tool_use(body, messages)
    want_logprobs = field_of(body, "logprobs", bool, False)
    top = field_of(body, "top_logprobs", int, None, lo=0, hi=20)
    if top is not None and not want_logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    req = await _request(state, body, state.chat_prompt(messages, use), (top or 0) if want_logprobs else None,
                         use.grammar)
    cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())

    def chunk(delta: dict, reason: str | None, events: list[TokenEvent] = ()) -> dict:
        lps = {"content": [_chat_logprob(state, e) for e in events]} if want_logprobs and events else None
        return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.name,
                "choices": [{"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}]}

    if field_of(body, "stream", bool, False):
        include_usage = _stream_options(body)
        events = generate(state, req)

        async def chunks():
            yield chunk({"role": "assistant", "content": ""}, None)
            held, holding, held_events = "", use.calling, []
            async for e in events:
                if isinstance(e, TokenEvent):
                    if holding:  # a reply that may be a tool call waits for the end
                        held += e.text
                        held_events.append(e)
                        holding = tools.may_start_call(held)
                        if not holding:
                            yield chunk({"content": held}, None, held_events)
                            held, held_events = "", []
                    elif e.text or want_logprobs:
                        yield chunk({"content": e.text}, None, [e])
                else:
                    if held or (holding and e.text):
                        delta, reason = use.call_delta(held + e.text, e.reason)
                        last = chunk(delta, reason, held_events)
                    else:
                        last = chunk({"content": e.text} if e.text else {}, e.reason)
                    last["timings"] = _timings(e)
                    yield last
                    if include_usage:
                        yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": state.name,
                               "choices": [], "usage": _usage(e)}
        return _sse(chunks(), req)
    events = await collect(request, state, req)
    done, tokens = events[-1], events[:-1]
    text = "".join(e.text for e in tokens) + done.text
    message, reason = use.message(text, done.reason)
    return JSONResponse({
        "id": cid, "object": "chat.completion", "created": created, "model": state.name,
        "choices": [{"index": 0, "message": message,
                     "logprobs": {"content": [_chat_logprob(state, e) for e in tokens]} if want_logprobs else None,
                     "finish_reason": reason}],
        "usage": _usage(done), "timings": _timings(done)})


# --- /v1/embeddings -------------------------------------------------------------------------------------------
@handles(openai_error)
async def create_embeddings(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.max_body)
    state.check_model(body.get("model"))
    if body.get("input") is None:
        raise ApiError(400, "'input' is required", "input")
    token_lists = state.embed_inputs(body["input"])
    encoding = field_of(body, "encoding_format", str, "float")
    if encoding not in ("float", "base64"):
        raise ApiError(400, "'encoding_format' must be 'float' or 'base64'", "encoding_format")
    dims = field_of(body, "dimensions", int, None, lo=1)
    vectors = await state.embed(token_lists)
    if dims is not None:  # OpenAI's shortened embeddings: the first dims values, renormalized
        vectors = [v[:dims] / max(float(np.linalg.norm(v[:dims])), 1e-12) for v in vectors]
    data = [{"object": "embedding", "index": i,
             "embedding": (base64.b64encode(np.asarray(v, "<f4").tobytes()).decode() if encoding == "base64"
                           else np.asarray(v, np.float32).tolist())} for i, v in enumerate(vectors)]
    n = sum(map(len, token_lists))
    return JSONResponse({"object": "list", "model": state.name, "data": data,
                         "usage": {"prompt_tokens": n, "total_tokens": n}})


def routes() -> list[Route]:
    return [Route("/v1/models", models), Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/embeddings", create_embeddings, methods=["POST"]),
            # llama-server's unversioned aliases
            Route("/models", models), Route("/completions", completions, methods=["POST"]),
            Route("/chat/completions", chat_completions, methods=["POST"]),
            Route("/embeddings", create_embeddings, methods=["POST"])]
