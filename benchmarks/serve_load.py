"""Load on `npulm serve` over loopback: C concurrent streaming clients x R requests each, against servers started with
--parallel 1 and --parallel 8 (real `npulm serve` processes), then a 10-turn chat's time to first token with and
without the prefix cache.

Every reply is greedy and checked against its own prompt's greedy output computed alone from an empty cache (in this
process, through the Python API): a reply that differs is counted as a mismatch (cross-talk or a batching error).
The load runs twice per --parallel: with the prefix cache (the server's default: a request reuses the longest prefix
a free slot holds; these prompts share their first 6 tokens) and without it (every prompt evaluated whole). A prompt
of up to DECODE_ROWS (16) tokens gives the same bits whether a prefix of it came from the cache or not (its rows go
through the fused attention, each row as alone); a longer one goes through BLAS when evaluated whole, and float
rounding may then flip a near-tie: mismatches with the cache on count those too. Prints Markdown tables: a batched
decode step's time, then errors, mismatches, p50 / p99 time to first token, aggregate generated tokens/s.

    python benchmarks/serve_load.py                    # 32 clients x 20 requests, SmolLM2, max_tokens 16
    python benchmarks/serve_load.py --clients 8 --requests 4 --parallel 1 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np

TOPICS = ["the sea", "a red fox", "winter mornings", "old trains", "bread", "a lighthouse", "chess", "rain in the city",
          "bees", "the moon", "a library", "mountain roads", "coffee", "a small robot", "autumn leaves", "the desert"]
PROMPTS = [f"Here is a short paragraph about {t}:" for t in TOPICS]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`npulm serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, parallel: int, ctx: int, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "npulm.cli", "serve", "-m", model, "--port", str(self.port), "-np", str(parallel),
               "-c", str(ctx * parallel), "--max-queue", "1024", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {' '.join(cmd)}")
            time.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, float, int]:
    """(text, seconds to the first text, completion tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, text, n = None, [], 0
    async with client.stream("POST", url, json={**body, "stream": True,
                                                "stream_options": {"include_usage": True}}) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
            for choice in chunk["choices"]:
                piece = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
                if piece and ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(piece)
    return "".join(text), ttft if ttft is not None else time.perf_counter() - t0, n


async def load(url: str, clients: int, requests: int, max_tokens: int, expected: dict[str, str]) -> dict:
    errors, mismatches, ttfts, tokens = 0, 0, [], 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one_client(i: int) -> None:
            nonlocal errors, mismatches, tokens
            for j in range(requests):
                prompt = PROMPTS[(i * requests + j) % len(PROMPTS)]
                try:
                    text, ttft, n = await stream_completion(client, url + "/v1/completions",
                                                            {"model": "smollm2-135m", "prompt": prompt,
                                                             "max_tokens": max_tokens, "temperature": 0})
                except (httpx.HTTPError, RuntimeError) as e:
                    errors += 1
                    print(f"  error: {e}", file=sys.stderr)
                    continue
                ttfts.append(ttft)
                tokens += n
                mismatches += text != expected[prompt]

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"errors": errors, "mismatches": mismatches, "n": len(ttfts), "tokens": tokens, "wall": wall,
            "p50": float(np.percentile(ttfts, 50)) if ttfts else float("nan"),
            "p99": float(np.percentile(ttfts, 99)) if ttfts else float("nan")}


async def chat_ttft(url: str, turns: int, max_tokens: int) -> list[float]:
    """Time to first token of each turn of one conversation whose history grows (greedy, the same replies with and
    without the prefix cache)."""
    messages = [{"role": "system", "content": "You are a helpful assistant. Answer in one or two sentences."}]
    out = []
    async with httpx.AsyncClient(timeout=600) as client:
        for k in range(turns):
            messages.append({"role": "user", "content": f"Tell me one fact about {TOPICS[k % len(TOPICS)]}."})
            text, ttft, _ = await stream_completion(client, url + "/v1/chat/completions",
                                                    {"model": "smollm2-135m", "messages": messages,
                                                     "max_tokens": max_tokens, "temperature": 0})
            messages.append({"role": "assistant", "content": text})
            out.append(ttft)
    return out


def decode_steps(model_name: str, ctx: int, slots: int, reps: int = 10) -> list[tuple[int, str, float]]:
    """One batched decode step (each sequence at its own position) at M = 1 and M = slots: (M, kernel, ms) medians.
    With weights repacked for the packed kernel (AVX-512 builds) that kernel serves every M; otherwise the CPU
    kernels' rows algorithm (what serve uses: rows computed as alone) and, at M = slots, their gemm."""
    from npulm.api import Llama
    from npulm.cpu import _kernels

    llm = Llama(model_name, n_ctx=ctx, verbose=False)
    model = llm.model
    caches = [model.make_cache() for _ in range(slots)]
    for cache, prompt in zip(caches, PROMPTS * slots):
        model.forward(llm.tokenize(prompt), cache)
    default, out = _kernels.get_gemm_min_m(), []
    packed = all(getattr(lin, "packed", False) for lin in model.linears)
    kernels = (("packed", 1),) if packed else (("rows", slots + 1), ("gemm", 1))
    try:
        for m in (1, slots):
            for kernel, min_m in kernels:
                if m == 1 and kernel == "gemm":
                    continue
                _kernels.set_gemm_min_m(min_m)
                times = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    model.forward_batch([[PROMPT_TOKEN]] * m, caches[:m])
                    times.append(time.perf_counter() - t0)
                    for cache in caches[:m]:
                        for layer in cache:
                            layer.trim(1)
                out.append((m, kernel, 1e3 * float(np.median(times))))
    finally:
        _kernels.set_gemm_min_m(default)
    return out


PROMPT_TOKEN = 42


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--parallel", type=int, nargs="+", default=[1, 8])
    ap.add_argument("-c", "--ctx-size", type=int, default=1024, help="context of each slot")
    ap.add_argument("--prefix-cache", choices=["both", "on", "off"], default="both",
                    help="load runs with the prefix cache on (the server's default), off, or both")
    ap.add_argument("--skip-steps", action="store_true", help="skip the decode-step table")
    ap.add_argument("--turns", type=int, default=10, help="turns of the prefix-cache chat (0: skip)")
    args = ap.parse_args()
    print(f"# serve_load: {args.clients} clients x {args.requests} streaming requests, max_tokens {args.max_tokens}, "
          f"{args.model}, {os.cpu_count()} CPUs\n")

    if not args.skip_steps:
        print("| decode step | kernel | ms | tokens/s |\n|---|---|---|---|")
        for m, kernel, ms in decode_steps(args.model, args.ctx_size, max(args.parallel)):
            print(f"| M = {m} | {kernel} | {ms:.1f} | {1e3 * m / ms:.1f} |")
        print()

    from npulm.api import Llama

    llm = Llama(args.model, n_ctx=args.ctx_size, verbose=False)
    expected = {}
    for p in PROMPTS:
        llm.reset()  # alone: from an empty cache
        expected[p] = llm.create_completion(p, max_tokens=args.max_tokens, temperature=0)["choices"][0]["text"]
    del llm
    caches = {"both": [True, False], "on": [True], "off": [False]}[args.prefix_cache]
    print("| --parallel | prefix cache | requests | errors | mismatches | TTFT p50 (s) | TTFT p99 (s) | tokens "
          "| wall (s) | aggregate tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    rates = {}
    for cached in caches:
        for p in args.parallel:
            server = Server(args.model, p, args.ctx_size, [] if cached else ["--no-prefix-cache"])
            try:
                r = asyncio.run(load(server.url, args.clients, args.requests, args.max_tokens, expected))
            finally:
                server.stop()
            rates[cached, p] = r["tokens"] / r["wall"]
            print(f"| {p} | {'on' if cached else 'off'} | {r['n']} | {r['errors']} | {r['mismatches']} | "
                  f"{r['p50']:.2f} | {r['p99']:.2f} | {r['tokens']} | {r['wall']:.1f} | {rates[cached, p]:.1f} |",
                  flush=True)
    if len(args.parallel) > 1:
        lo, hi = min(args.parallel), max(args.parallel)
        print()
        for cached in caches:
            print(f"aggregate tok/s, --parallel {hi} / --parallel {lo}, prefix cache {'on' if cached else 'off'}: "
                  f"{rates[cached, hi] / rates[cached, lo]:.2f}x")
    if args.turns:
        print(f"\n{args.turns}-turn chat, time to first token per turn (s), --parallel 1:\n")
        rows = {}
        for label, extra in (("prefix cache", []), ("no prefix cache", ["--no-prefix-cache"])):
            server = Server(args.model, 1, args.ctx_size, extra)
            try:
                rows[label] = asyncio.run(chat_ttft(server.url, args.turns, 32))
            finally:
                server.stop()
        print("| | " + " | ".join(str(k + 1) for k in range(args.turns)) + " | mean |")
        print("|---" * (args.turns + 2) + "|")
        for label, ttfts in rows.items():
            print(f"| {label} | " + " | ".join(f"{t:.2f}" for t in ttfts) + f" | {np.mean(ttfts):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
