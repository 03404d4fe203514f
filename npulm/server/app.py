"""The ASGI app (Starlette): what the OpenAI and Ollama routes share (request parsing, errors, auth, the bridge from
the engine thread to a request's coroutine, metrics) plus /health, /metrics and the web page at /."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import __version__, embeddings
from ..sampling import SamplingParams, make_sampler
from ..tools import ToolUse
from .engine import DoneEvent, Engine, EngineStopped, ErrorEvent, GenRequest, QueueFull, TokenEvent

log = logging.getLogger("npulm.server")


class ApiError(Exception):
    """An error answered to the client: its status, a one-line message and OpenAI's type / param / code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(status, "server_error")


def openai_error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                        status_code=e.status)


def ollama_error(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": e.message}, status_code=e.status)


@dataclass
class ServerState:
    """What the routes share: the loaded model (a `Llama`, used for its tokenizer, template and metadata; only the
    engine thread runs the model), the engine, the served name, auth and limits."""
    llm: Any
    engine: Engine
    name: str
    api_key: str | None = None
    max_body: int = 4 << 20
    started: float = field(default_factory=time.time)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    embed_cache: list | None = None

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("npulm_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.ttft = Histogram("npulm_time_to_first_token_seconds", "queue + prompt time until the first token",
                              buckets=(.05, .1, .25, .5, 1, 2, 5, 10, 30, 60), registry=r)
        r.register(_EngineCollector(self.engine))

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    def check_model(self, model: Any, param: str = "model") -> None:
        if model is None:
            return  # clients that send no model get the one the server runs
        names = {self.name, f"{self.name}:latest", Path(self.llm.model_path).name, Path(self.llm.model_path).stem}
        if not isinstance(model, str) or model not in names:
            raise ApiError(404, f"model {model!r} not found; this server runs {self.name!r}", param,
                           "model_not_found")

    async def grammar_tokenizer(self):
        """llguidance's view of the vocabulary, built once (seconds on a large vocabulary: off the event loop)."""
        return await asyncio.to_thread(self.llm._lltok)

    def sampler(self, params: dict[str, Any], where: str = "", grammar: str | None = None, lltok: Any = None):
        """A seeded sampler from the request's sampling fields (SamplingParams' names), constrained by `grammar`
        (npulm.grammar) when given; bad values are a 400 naming the field. No seed: one drawn from the server's
        generator."""
        if params.get("seed") is None or params["seed"] < 0:
            params = {**params, "seed": int(self.rng.integers(0, 2**31 - 1))}
        try:
            constraint = None
            if grammar is not None:
                from ..grammar import GrammarConstraint, GrammarError

                try:
                    constraint = GrammarConstraint(lltok, grammar)
                except GrammarError as e:
                    raise ApiError(400, str(e), "response_format") from None
            return make_sampler(SamplingParams(**params), n_vocab=self.llm.n_vocab(), constraint=constraint)
        except (ValueError, TypeError) as e:
            name = str(e).split(" ", 1)[0]
            raise ApiError(400, f"{where}{e}", where + name if name in params else None) from None

    def token_text(self, token: int) -> str:
        return self.llm.tokenizer.token_to_bytes(token).decode("utf-8", errors="replace")

    def tool_use(self, body: dict, messages: list[dict]) -> ToolUse:
        """The request's tools / tool_choice (OpenAI's legacy functions / function_call too; Ollama sends tools
        only), checked: a 400 naming the field."""
        for key in ("tools", "functions"):
            if body.get(key) is not None and not isinstance(body[key], list):
                raise ApiError(400, f"'{key}' must be a list of tool definitions", key)
        try:
            return ToolUse(messages, body.get("tools"), body.get("tool_choice"),
                           self.llm.chat_template.source, body.get("functions"), body.get("function_call"))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            field = "tool_choice" if "tool_choice" in str(e) else "tools"
            raise ApiError(400, f"bad tools: {e}", field) from None

    def chat_prompt(self, messages: list[dict], tools: ToolUse | None = None) -> list[int]:
        try:
            return tools.prompt(self.llm.apply_chat_template) if tools else self.llm.apply_chat_template(messages)
        except ValueError as e:  # the template raised or failed (ChatTemplate's messages name which)
            raise ApiError(400, str(e), "messages", "chat_template_error") from None

    def embed_inputs(self, value: Any, param: str = "input") -> list[list[int]]:
        """A text, texts, token ids or lists of token ids -> token lists, each within the context."""
        if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(t, int) for t in value)):
            value = [value]
        if not isinstance(value, list) or not value:
            raise ApiError(400, f"'{param}' must be a string, a list of strings or of token ids", param)
        out = []
        for item in value:
            if isinstance(item, str):
                tokens = self.llm.tokenize(item)
            elif isinstance(item, list) and item and all(isinstance(t, int) and not isinstance(t, bool) and
                                                          0 <= t < self.llm.n_vocab() for t in item):
                tokens = item
            else:
                raise ApiError(400, f"'{param}' must be a string, a list of strings or of token ids", param)
            if not tokens or len(tokens) > self.n_ctx:
                raise ApiError(400, f"an input of {len(tokens)} tokens does not fit this server's context of "
                                    f"{self.n_ctx} tokens", param, "context_length_exceeded")
            out.append(tokens)
        return out

    async def embed(self, token_lists: list[list[int]]) -> list[np.ndarray]:
        """Unit-length embeddings (npulm.embeddings: the GGUF's pooling, mean when it declares none), computed on
        the engine thread between two steps."""
        pooling = self.llm.pooling_type() or embeddings.POOLING_MEAN

        def job() -> list[np.ndarray]:
            if self.embed_cache is None:
                self.embed_cache = self.llm.model.make_cache()
            return embeddings.embed_tokens(self.llm.model, self.embed_cache, token_lists, pooling, True)

        try:
            future = self.engine.run_job(job)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}; retry later", code="queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), code="unavailable") from None
        return await asyncio.wrap_future(future)

    def check_length(self, prompt: list[int], max_tokens: int | None, param: str = "max_tokens") -> None:
        """OpenAI's rule: the prompt plus the requested completion must fit the context."""
        if not prompt:
            raise ApiError(400, "the prompt is empty", "prompt")
        if len(prompt) >= self.n_ctx:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; this server's context is {self.n_ctx} "
                                "tokens and must also hold the reply", "messages", "context_length_exceeded")
        if max_tokens is not None and len(prompt) + max_tokens > self.n_ctx:
            raise ApiError(400, f"this server's context is {self.n_ctx} tokens, but {len(prompt)} prompt tokens + "
                                f"{param}={max_tokens} were requested", param, "context_length_exceeded")


class _EngineCollector:
    """Reads the engine's gauges and counters at scrape time."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        e = self.engine
        yield GaugeMetricFamily("npulm_queue_depth", "requests waiting for a slot", value=e.queued)
        yield GaugeMetricFamily("npulm_slots_busy", "slots generating", value=e.busy)
        yield GaugeMetricFamily("npulm_slots", "slots (--parallel)", value=len(e.slots))
        yield GaugeMetricFamily("npulm_tokens_per_second", "generated tokens/s over the last 10 s, all slots",
                                value=e.tokens_per_second())
        yield CounterMetricFamily("npulm_prompt_tokens_evaluated", "prompt tokens run through the model",
                                  value=e.n_prompt_eval)
        yield CounterMetricFamily("npulm_generated_tokens", "tokens generated", value=e.n_generated)
        yield CounterMetricFamily("npulm_prefix_cache_hits", "requests that reused a slot's cached prefix",
                                  value=e.prefix_hits)
        yield CounterMetricFamily("npulm_prefix_cache_tokens", "prompt tokens reused from slots' caches",
                                  value=e.prefix_tokens)


# --- request bodies --------------------------------------------------------------------------------------------
async def read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"request body of {int(size)} bytes exceeds the server's limit of {limit} bytes")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the server's limit of {limit} bytes")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def field_of(body: dict, key: str, kind: type | tuple[type, ...], default: Any = None, *, lo: float | None = None,
             hi: float | None = None, where: str = "") -> Any:
    """body[key] checked for type and range, or default when absent / null."""
    value = body.get(key)
    if value is None:
        return default
    name = where + key
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if float in kinds:
        kinds = (*kinds, int)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        want = " or ".join(k.__name__ for k in kinds if k is not int or float not in kinds)
        raise ApiError(400, f"'{name}' must be {want}, not {type(value).__name__}", name)
    if lo is not None and value < lo or hi is not None and value > hi:
        raise ApiError(400, f"'{name}' must be in [{lo}, {hi}], got {value}", name)
    return value


def sampling_fields(body: dict, names: dict[str, str], defaults: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The request's sampling fields under SamplingParams' names (names: request field -> SamplingParams field),
    type-checked; absent ones take `defaults`."""
    out = dict(defaults)
    for key, name in names.items():
        kind = int if name in ("top_k", "repeat_last_n", "seed", "mirostat_mode", "dry_allowed_length",
                               "dry_penalty_last_n") else float
        value = field_of(body, key, kind, None, where=where)
        if value is not None:
            out[name] = value
    return out


def stop_list(value: Any, name: str = "stop") -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ApiError(400, f"'{name}' must be a string or a list of strings", name)


def message_list(value: Any) -> list[dict]:
    """Chat messages with string content (OpenAI's text parts are joined; other parts are refused)."""
    if value is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(value, list) or not value:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a 'role'", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ApiError(400, f"messages[{i}]: only text content parts are supported", f"messages[{i}]")
                parts.append(p["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        out.append({**m, "content": content or ""})
    return out


# --- from the engine thread to the request's coroutine ---------------------------------------------------------
def generate(state: ServerState, req: GenRequest) -> AsyncIterator[TokenEvent | DoneEvent]:
    """Submit now (a full queue or a stopped engine raise ApiError here, before any reply is sent) and return the
    request's events until DoneEvent. Leaving the iteration early (a disconnect cancels the consuming task) cancels
    the generation: the engine frees the slot at its next step."""
    req.loop, req.events = asyncio.get_running_loop(), asyncio.Queue()
    try:
        state.engine.submit(req)
    except QueueFull as e:
        raise ApiError(429, f"server busy: {e}; retry later", code="queue_full") from None
    except EngineStopped as e:
        raise ApiError(503, str(e), code="unavailable") from None
    return _events(state, req)


async def _events(state: ServerState, req: GenRequest) -> AsyncIterator[TokenEvent | DoneEvent]:
    first = True
    try:
        while True:
            event = await req.events.get()
            if isinstance(event, ErrorEvent):
                log.error("generation failed: %s: %s", type(event.error).__name__, event.error)
                raise ApiError(503 if isinstance(event.error, EngineStopped) else 500,
                               f"generation failed: {type(event.error).__name__}: {event.error}")
            if first:
                first = False
                state.ttft.observe(time.monotonic() - req.t_submit)
            yield event
            if isinstance(event, DoneEvent):
                log.info("request done: %d prompt tokens (%d cached), %d generated, %s", event.n_prompt,
                         event.n_cached, event.n_gen, event.reason)
                return
    finally:
        req.cancel()


async def until_disconnect(request: Request, req: GenRequest) -> None:
    """Cancel `req` when the client goes away (for replies that are not streamed)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            return


async def collect(request: Request, state: ServerState, req: GenRequest) -> list[TokenEvent | DoneEvent]:
    watch = asyncio.create_task(until_disconnect(request, req))
    try:
        return [event async for event in generate(state, req)]
    finally:
        watch.cancel()


# --- app ---------------------------------------------------------------------------------------------------------
def _route_label(path: str) -> str:
    for prefix in ("/v1/", "/api/"):
        if path.startswith(prefix):
            return path
    return path if path in ("/", "/health", "/metrics") else "other"


class AuthAndMetrics:
    """Pure ASGI middleware (streams pass through untouched): with an API key, every route but /health takes it as
    `Authorization: Bearer KEY` (API clients) or as the password of HTTP Basic auth (any user name): a browser has no
    way to send a Bearer header for a page load, but it asks for Basic credentials on the page's 401 and then sends
    them with the page's own requests. Also the request counter."""

    OPEN = ("/health",)

    def __init__(self, app: Callable[..., Awaitable[None]], state: ServerState):
        self.app, self.state = app, state

    def authorized(self, scope) -> bool:
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = auth.partition(" ")
        given = value.strip()
        if scheme.lower() == "basic":
            try:
                given = base64.b64decode(given, validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(given.encode(), self.state.api_key.encode())

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        status = [0]

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        if self.state.api_key and path not in self.OPEN and not self.authorized(scope):
            e = ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", code="invalid_api_key")
            response = ollama_error(e) if path.startswith("/api/") else openai_error(e)
            # Basic on every route: a browser shows its login dialog for the page, and answers the page's own API
            # requests' challenges with what the user typed there (it sends nothing before a challenge it can meet)
            response.headers["WWW-Authenticate"] = 'Basic realm="npulm", charset="UTF-8"'
            response.headers.append("WWW-Authenticate", 'Bearer realm="npulm"')
            await response(scope, receive, send_counting)
            self.state.requests.labels(_route_label(path), "401").inc()
            return
        try:
            await self.app(scope, receive, send_counting)
        finally:
            self.state.requests.labels(_route_label(path), str(status[0] or 499)).inc()


def handles(errors: Callable[[ApiError], Response]):
    """Route decorator: ApiError -> the API's error object."""
    def wrap(fn):
        async def route(request: Request) -> Response:
            try:
                return await fn(request, request.app.state.npulm)
            except ApiError as e:
                return errors(e)
        route.__name__ = fn.__name__
        return route
    return wrap


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.npulm
    ok = state.engine.running
    return JSONResponse({"status": "ok" if ok else "error", "slots_idle": len(state.engine.slots) - state.engine.busy,
                         "slots_processing": state.engine.busy, "queue": state.engine.queued},
                        status_code=200 if ok else 503)


async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.npulm.registry),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


async def page(request: Request) -> Response:
    return Response((resources.files(__package__) / "static" / "index.html").read_bytes(), media_type="text/html")


def version() -> str:
    return __version__
