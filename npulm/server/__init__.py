"""`npulm serve`: one model, one NPU owner, many clients. An OpenAI- and Ollama-compatible HTTP server (Starlette +
uvicorn) with continuous batching over `--parallel` slots (engine.py), and a chat page at /.

Needs the `serve` extra (pip install "npulm[serve]"); importing this package does not."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path


def add_parser(sub, add_model: Callable, add_runtime: Callable) -> None:
    """Register `npulm serve` with the CLI's shared model and placement flags."""
    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible server with a chat page (needs npulm[serve])")
    add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=os.environ.get("NPULM_API_KEY"),
                   help="require the key on every route but /health: 'Authorization: Bearer KEY', or as the "
                        "Basic-auth password a browser asks for on the chat page (default: $NPULM_API_KEY)")
    p.add_argument("-np", "--parallel", type=int, default=4, help="slots: requests generated together in one batch")
    p.add_argument("-a", "--alias", default=None, help="model name clients use (default: the model's name)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 429")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse a slot's cached prompt prefix")
    p.add_argument("--no-exact-batching", dest="exact_batching", action="store_false",
                   help="let decode batches of 8+ rows use the CPU gemm kernel (faster; greedy replies may then "
                        "differ from a lone run's at near-ties)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (413 beyond)")
    p.add_argument("--spec", choices=("lookup",), default=None,
                   help="speculative decoding in every slot: 'lookup' drafts by n-gram lookup in the prompt and the "
                        "reply so far, verified with the other slots' rows in one pass (replies unchanged)")
    p.add_argument("--draft-max", type=int, default=16, help="most draft tokens a slot verifies in a step")
    add_runtime(p, 16384)  # -c: the total over the slots, as llama-server's (4 slots of 4096 by default)
    p.set_defaults(batch_size=128, func=cmd_serve)  # -b: prompt tokens per step, the longest stall of the others


def served_name(model_arg: str | None, model_path: str) -> str:
    from .. import assets

    return model_arg if model_arg in assets.MODELS else Path(model_path).stem


def slot_context(model: str | None, ctx_size: int, parallel: int) -> int:
    """Each slot's context, as llama-server divides it: `-c` is the total over the slots (0 = the model's trained
    context), each of the `-np` slots holding an equal share."""
    if ctx_size <= 0:
        from .. import assets
        from ..gguf import GGUFFile
        from ..models.base import hparam

        gguf = GGUFFile(str(assets.resolve_model(model)))
        ctx_size = hparam(gguf.kv, gguf.architecture, "context_length", 4096)
    if ctx_size < parallel:
        raise ValueError(f"-c {ctx_size} cannot be shared by {parallel} slots (-np): each needs at least one token")
    return ctx_size // parallel


def build(args: argparse.Namespace):
    """Load the model and make the app (what `npulm serve` runs; tests call it too)."""
    from ..api import Llama
    from .app import ServerState
    from .asgi import create_app
    from .engine import Engine

    layers = args.npu_layers if args.npu_layers == "all" else int(args.npu_layers)
    llm = Llama(args.model, n_ctx=slot_context(args.model, args.ctx_size, args.parallel), n_batch=args.batch_size,
                n_threads=args.threads, n_npu_layers=layers, pipeline=args.pipeline,
                tensor_overrides=args.override_tensor, chip=args.chip, verbose=True)
    speculator = None
    if getattr(args, "spec", None) == "lookup":
        from ..speculative import PromptLookup, Speculator

        def speculator() -> Speculator:
            return Speculator(PromptLookup(), draft_max=getattr(args, "draft_max", 16))
    engine = Engine(llm.model, llm.tokenizer, args.parallel, args.batch_size, args.max_queue, args.prefix_cache,
                    exact_decode=getattr(args, "exact_batching", True), speculator=speculator)
    state = ServerState(llm, engine, args.alias or served_name(args.model, llm.model_path), api_key=args.api_key,
                        max_body=args.max_body)
    return create_app(state)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError:
        print('npulm: error: the server needs its extra: pip install "npulm[serve]"', file=sys.stderr)
        return 1
    logging.basicConfig(level=logging.INFO, format="npulm: %(message)s")
    app = build(args)
    state = app.state.npulm
    print(f"npulm: serving {state.name!r} on http://{args.host}:{args.port}/ ({args.parallel} slots of "
          f"{state.n_ctx} tokens{', API key required' if args.api_key else ''})", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_graceful_shutdown=5)
    return 0
