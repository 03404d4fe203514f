"""Ollama's API: /api/generate and /api/chat (NDJSON streams, on by default), /api/tags, /api/show,
/api/version, /api/ps, with Ollama's option names and defaults."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..tools import ToolUse
from .app import (
    ApiError,
    ServerState,
    collect,
    field_of,
    generate,
    handles,
    message_list,
    ollama_error,
    read_json,
    sampling_fields,
    stop_list,
    version,
)
from .engine import DoneEvent, GenRequest, TokenEvent


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


async def _request(state: ServerState, body: dict, prompt: list[int]) -> GenRequest:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object", "options")

    def opt(key, kind, default, **kw):
        return field_of(options, key, kind, default, where="options.", **kw)

    n_predict = opt("num_predict", int, -1, lo=-2)  # -1: no limit, -2: fill the context (as Ollama)
    num_ctx = opt("num_ctx", int, None, lo=1)
    if num_ctx is not None and num_ctx < state.n_ctx:  # a smaller window for this request; larger ones: the -c
        n_predict = min(n_predict if n_predict > 0 else num_ctx, max(num_ctx - len(prompt), 1))
    max_tokens = n_predict if n_predict > 0 else None
    state.check_length(prompt, max_tokens, "options.num_predict")
    fmt = body.get("format")  # Ollama: "json" or a JSON schema
    grammar = None
    if fmt not in (None, ""):
        from ..grammar import json_schema_grammar

        if fmt != "json" and not isinstance(fmt, dict):
            raise ApiError(400, "'format' must be \"json\" or a JSON schema object", "format")
        try:
            grammar = json_schema_grammar(None if fmt == "json" else fmt)
        except (ValueError, TypeError) as e:
            raise ApiError(400, str(e), "format") from None
    lltok = await state.grammar_tokenizer() if grammar is not None else None
    sampler = state.sampler(sampling_fields(options, SAMPLING, DEFAULTS, "options."), "options.", grammar, lltok)
    top = field_of(body, "top_logprobs", int, None, lo=0, hi=20)
    logprobs = (top or 0) if field_of(body, "logprobs", bool, False) else None
    return GenRequest(prompt, sampler, max_tokens, stop_list(options.get("stop"), "options.stop"), logprobs)


# Ollama's option names -> SamplingParams, and Ollama's defaults
SAMPLING = {k: k for k in ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n",
                           "frequency_penalty", "presence_penalty", "seed", "mirostat_tau", "mirostat_eta")}
SAMPLING["mirostat"] = "mirostat_mode"
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0, "repeat_penalty": 1.1, "repeat_last_n": 64}


def _final(done: DoneEvent) -> dict:
    ns = 1_000_000_000
    return {"done": True, "done_reason": done.reason, "total_duration": int((done.t_prompt + done.t_gen) * ns),
            "load_duration": 0, "prompt_eval_count": done.n_prompt - done.n_cached,
            "prompt_eval_duration": int(done.t_prompt * ns), "eval_count": done.n_gen,
            "eval_duration": int(done.t_gen * ns)}


def _logprobs(state: ServerState, e: TokenEvent) -> list[dict]:
    return [{"token": state.token_text(e.token), "logprob": e.logprob,
             "top_logprobs": [{"token": state.token_text(t), "logprob": lp} for t, lp in e.top or []]}]


async def _body(request: Request, state: ServerState) -> dict:
    """The request's JSON, which must name the served model (Ollama requires `model`)."""
    body = await read_json(request, state.max_body)
    if body.get("model") is None:
        raise ApiError(400, "'model' is required", "model")
    state.check_model(body["model"])
    return body


async def _reply(request: Request, state: ServerState, body: dict, req: GenRequest, shape) -> Response:
    """Stream NDJSON (Ollama's default) or answer one object; `shape(text, done_fields)` builds each line."""
    if field_of(body, "stream", bool, True):
        events = generate(state, req)

        async def lines():
            try:
                async for e in events:
                    if isinstance(e, TokenEvent):
                        if e.text or req.logprobs is not None:
                            line = shape(e.text, {"done": False})
                            if req.logprobs is not None:
                                line["logprobs"] = _logprobs(state, e)
                            yield json.dumps(line, ensure_ascii=False) + "\n"
                    else:
                        if e.text:
                            yield json.dumps(shape(e.text, {"done": False}), ensure_ascii=False) + "\n"
                        yield json.dumps(shape("", _final(e), req, e), ensure_ascii=False) + "\n"
            except ApiError as err:  # after the 200 header: Ollama sends the error as a line
                yield json.dumps({"error": err.message}) + "\n"
            finally:
                req.cancel()

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    events = await collect(request, state, req)
    done, tokens = events[-1], events[:-1]
    out = shape("".join(e.text for e in tokens) + done.text, _final(done), req, done)
    if req.logprobs is not None:
        out["logprobs"] = [lp for e in tokens for lp in _logprobs(state, e)]
    return JSONResponse(out)


@handles(ollama_error)
async def api_generate(request: Request, state: ServerState) -> Response:
    body = await _body(request, state)
    prompt = field_of(body, "prompt", str, "")
    system = field_of(body, "system", str, None)
    context = body.get("context") or []
    if not isinstance(context, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise ApiError(400, "'context' must be a list of token ids", "context")
    if not prompt and not context:  # Ollama: an empty prompt loads the model
        return JSONResponse({"model": state.name, "created_at": _now(), "response": "", "done": True,
                             "done_reason": "load"})
    if field_of(body, "raw", bool, False) or context:
        tokens = list(context) + state.llm.tokenize(prompt, add_bos=not context)
    else:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        tokens = state.chat_prompt(messages)
    req = await _request(state, body, tokens)

    def shape(text: str, fields: dict, req: GenRequest | None = None, done: DoneEvent | None = None) -> dict:
        out = {"model": state.name, "created_at": _now(), "response": text, **fields}
        if done is not None:
            out["context"] = req.prompt + list(done.tokens)
        return out

    return await _reply(request, state, body, req, shape)


def ollama_message(use: ToolUse, text: str, reason: str) -> dict:
    """A finished reply as Ollama's message: tool calls with their arguments as objects, not JSON text."""
    msg, _ = use.message(text, reason)
    out = {"role": "assistant", "content": msg.get("content") or ""}
    if msg.get("tool_calls"):
        out["tool_calls"] = [{"function": {"name": c["function"]["name"],
                                           "arguments": json.loads(c["function"]["arguments"])}}
                             for c in msg["tool_calls"]]
    return out


@handles(ollama_error)
async def api_chat(request: Request, state: ServerState) -> Response:
    body = await _body(request, state)
    messages = message_list(body.get("messages"))
    use = state.tool_use(body, messages)
    req = await _request(state, body, state.chat_prompt(messages, use))
    if use.calling:  # as Ollama: a reply that may hold tool calls comes whole, in one message (streamed or not)
        events = await collect(request, state, req)
        done, tokens = events[-1], events[:-1]
        out = {"model": state.name, "created_at": _now(),
               "message": ollama_message(use, "".join(e.text for e in tokens) + done.text, done.reason),
               **_final(done)}
        if field_of(body, "stream", bool, True):
            return StreamingResponse(iter([json.dumps(out, ensure_ascii=False) + "\n"]),
                                     media_type="application/x-ndjson")
        return JSONResponse(out)

    def shape(text: str, fields: dict, req: GenRequest | None = None, done: DoneEvent | None = None) -> dict:
        return {"model": state.name, "created_at": _now(), "message": {"role": "assistant", "content": text},
                **fields}

    return await _reply(request, state, body, req, shape)


@handles(ollama_error)
async def api_embed(request: Request, state: ServerState) -> Response:
    body = await _body(request, state)
    legacy = request.url.path.endswith("/embeddings")  # /api/embeddings: {"prompt"} -> {"embedding"}
    token_lists = state.embed_inputs(body.get("prompt" if legacy else "input"), "prompt" if legacy else "input")
    t0 = time.perf_counter()
    vectors = await state.embed(token_lists)
    if legacy:
        return JSONResponse({"embedding": vectors[0].tolist()})
    return JSONResponse({"model": state.name, "embeddings": [v.tolist() for v in vectors],
                         "total_duration": int((time.perf_counter() - t0) * 1e9), "load_duration": 0,
                         "prompt_eval_count": sum(map(len, token_lists))})


# --- model information -----------------------------------------------------------------------------------------
def _details(state: ServerState) -> dict:
    kv = state.llm.metadata
    arch = kv.get("general.architecture", "")
    n = sum(t.n_elements for t in state.llm.gguf.tensors.values())
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    types: dict[str, int] = {}  # the type holding most weights names the quantization, as Ollama shows it
    for t in state.llm.gguf.tensors.values():
        types[t.type.name] = types.get(t.type.name, 0) + t.n_elements
    quant = max(types, key=types.get) if types else ""
    return {"parent_model": "", "format": "gguf", "family": arch, "families": [arch], "parameter_size": size,
            "quantization_level": quant}


def _digest(state: ServerState) -> str:
    if not hasattr(state, "_digest"):
        h = hashlib.sha256()
        with open(state.llm.model_path, "rb") as f:
            while piece := f.read(1 << 20):
                h.update(piece)
        state._digest = h.hexdigest()
    return state._digest


def _entry(state: ServerState) -> dict:
    path = state.llm.model_path
    modified = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return {"name": state.name, "model": state.name, "modified_at": modified.isoformat().replace("+00:00", "Z"),
            "size": os.path.getsize(path), "digest": _digest(state), "details": _details(state)}


async def api_tags(request: Request) -> Response:
    return JSONResponse({"models": [_entry(request.app.state.npulm)]})


async def api_ps(request: Request) -> Response:
    state: ServerState = request.app.state.npulm
    return JSONResponse({"models": [{**_entry(state), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                                     "context_length": state.n_ctx}]})


@handles(ollama_error)
async def api_show(request: Request, state: ServerState) -> Response:
    body = await read_json(request, state.max_body)
    name = body.get("model", body.get("name"))
    if name is None:
        raise ApiError(400, "'model' is required", "model")
    state.check_model(name)
    info: dict[str, Any] = {k: v for k, v in state.llm.metadata.items()
                            if not k.startswith("tokenizer.chat_template") and isinstance(v, (int, float, str, bool))}
    template = state.llm.metadata.get("tokenizer.chat_template", "")
    return JSONResponse({"modelfile": f"FROM {state.llm.model_path}\n", "parameters": f"num_ctx {state.n_ctx}",
                         "template": template, "details": _details(state), "model_info": info,
                         "capabilities": ["completion"], "modified_at": _entry(state)["modified_at"]})


async def api_version(request: Request) -> Response:
    return JSONResponse({"version": version()})


def routes() -> list[Route]:
    return [Route("/api/generate", api_generate, methods=["POST"]), Route("/api/chat", api_chat, methods=["POST"]),
            Route("/api/tags", api_tags), Route("/api/ps", api_ps), Route("/api/show", api_show, methods=["POST"]),
            Route("/api/version", api_version), Route("/api/embed", api_embed, methods=["POST"]),
            Route("/api/embeddings", api_embed, methods=["POST"])]
