"""Speculative decoding, measured: plain greedy decode vs prompt lookup on input-grounded tasks (rewrite / continue /
extract from lee_background passages, a code edit) and on free generation, per model, in one run.

    python benchmarks/speculative.py [--models smollm2-135m,gemma3-270m] [-n 128] [-t 2] [--llama-cpp]

Prints (markdown):
  1. the cost of a verify pass of M = 1, 2, 4, 8 rows: measured here (min of --reps passes after --context tokens)
     and modeled on the RK3588 (npulm.npu.cost: the CPU alone, and the planner's best NPU placement); where a pass
     goes here, part by part (matmuls per placement, attention, the rest);
  2. per task: tg tok/s plain and with lookup (decode only: the prompt is evaluated before the clock starts), the
     ratio, acceptance (accepted / drafted), tokens per verify pass, whether the text is identical (it must be);
     with --llama-cpp, llama-cpp-python's own plain and LlamaPromptLookupDecoding rows on the same prompts;
  3. the predicted speed-up on the board: the lookup run repeated with the draft length chosen from the modeled
     RK3588 pass cost of the planner's best placement, its passes priced with that cost against plain decode's.
Ratios come from the fastest of --rounds alternating plain and lookup runs per task (one slow moment of a shared
machine would otherwise decide a ratio); only ratios mean much there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from npulm import assets  # noqa: E402
from npulm.api import Llama  # noqa: E402
from npulm.generate import Session, generate  # noqa: E402
from npulm.sampling import make_sampler  # noqa: E402
from npulm.speculative import PromptLookup, Speculator, exact_rows  # noqa: E402

CODE = '''def total_price(items, tax_rate):
    """Sum of the item prices with tax."""
    subtotal = 0.0
    for item in items:
        subtotal += item["price"] * item["quantity"]
    tax = subtotal * tax_rate
    return subtotal + tax


def print_receipt(items, tax_rate):
    for item in items:
        print(f"{item['name']:20s} {item['quantity']:3d} x {item['price']:8.2f}")
    print(f"{'total':20s} {total_price(items, tax_rate):16.2f}")


if __name__ == "__main__":
    cart = [{"name": "apple", "price": 0.5, "quantity": 6}, {"name": "bread", "price": 2.25, "quantity": 1}]
    print_receipt(cart, 0.08)
'''


def passages(n: int, words: int = 130) -> list[str]:
    lines = [ln for ln in assets.lee_background().read_text(encoding="utf-8").splitlines() if len(ln.split()) > words]
    return [" ".join(ln.split()[:words]) for ln in lines[:n]]


def tasks() -> list[tuple[str, str, str]]:
    """(set, name, instruction-or-text): 'grounded' answers mostly from the input, 'free' does not."""
    p = passages(4)
    first = " ".join(p[1].split()[:12])
    return [
        ("grounded", "rewrite", f"Rewrite this news article in simpler words, sentence by sentence:\n\n{p[0]}"),
        ("grounded", "continue", f"Article:\n{p[1]}\n\nThe same article, copied exactly:\n{first}"),
        ("grounded", "extract", f"Copy every sentence of this article that names a person:\n\n{p[2]}"),
        ("grounded", "code-edit", "Rename the function total_price to order_total everywhere in this code and "
                                  f"print the whole file:\n\n```python\n{CODE}```"),
        ("free", "story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
        ("free", "explain", "Explain to a ten-year-old how vaccines teach the body to fight germs."),
        ("free", "essay", "The history of the Roman Empire"),
    ]


def prompt_tokens(llm: Llama, task: tuple[str, str, str]) -> list[int]:
    _, name, text = task
    if name == "continue" or name == "essay" or "tokenizer.chat_template" not in llm.gguf.kv:
        return llm.tokenize(text if name in ("continue", "essay") else f"{text}\n\nAnswer:\n")
    return llm.apply_chat_template([{"role": "user", "content": text}])


def decode(llm: Llama, prompt: list[int], n: int, spec: Speculator | None) -> tuple[list[int], float]:
    """Greedy tokens after the prompt and the seconds they took (the prompt evaluated before the clock)."""
    session = Session(llm.model)
    session.prefill(prompt)
    t0 = time.perf_counter()
    out = list(generate(session, prompt, make_sampler(0), n, llm.tokenizer.eog_ids, spec))
    return out, time.perf_counter() - t0


# --- pass cost -----------------------------------------------------------------------------------------------------

def timed_passes(llm: Llama, ms: list[int], reps: int, context: int = 200,
                 parts: dict[str, float] | None = None) -> dict[int, dict[str, float]]:
    """The fastest of `reps` passes of M random tokens after `context` cached ones, per M: {"total": seconds}, plus
    what `parts` (cleared before each pass, filled by timed pieces of the model) held after it."""
    from npulm.models.cache import trim_cache

    model, rng = llm.model, np.random.default_rng(0)
    cache = model.make_cache()
    model.forward(rng.integers(0, model.n_vocab, context).tolist(), cache)
    parts = {} if parts is None else parts
    best: dict[int, dict[str, float]] = {}
    for _ in range(reps):
        for m in ms:
            toks = rng.integers(0, model.n_vocab, m).tolist()
            parts.clear()
            t0 = time.perf_counter()
            model.forward(toks, cache, logits_from=0)
            total = time.perf_counter() - t0
            trim_cache(cache, m)
            if m not in best or total < best[m]["total"]:
                best[m] = {**parts, "total": total}
    return best


def _timed(fn, seconds: dict[str, float], key: str):
    """fn, adding its wall time to seconds[key] (for pass_parts)."""
    def call(*args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        return out
    return call


def pass_parts(llm: Llama, ms: list[int], reps: int, context: int = 200) -> dict[int, dict[str, float]]:
    """Where an M-row pass goes: seconds in the matmuls per placement ("cpu:a16", "cpu:a8", ...: the Linears the
    blocks and the model hold; a mixture's experts count in the rest), in attention (queries against the cache) and
    in the rest (norms, RoPE, activations, Python), from the fastest of timed_passes with each part timed (the timing
    adds a little to each part)."""
    from npulm.linear import Linear
    from npulm.models import blocks as B

    model, seconds = llm.model, {}
    saved = [(o, k, v) for o in (*model.blocks, model) for k, v in vars(o).items() if isinstance(v, Linear)]
    attention = B.attention
    try:
        for o, k, v in saved:
            setattr(o, k, _timed(v, seconds, v.runs_on))
        B.attention = _timed(attention, seconds, "attention")
        best = timed_passes(llm, ms, reps, context, seconds)
    finally:
        B.attention = attention
        for o, k, v in saved:
            setattr(o, k, v)
    for p in best.values():
        p["rest"] = p["total"] - sum(v for k, v in p.items() if k != "total")
    return best


def board_pass_cost(path: str):
    """Seconds of an M-row verify pass on the RK3588, modeled (npulm.npu.cost): {"plan": f(M), "W16A16": f(M)} for
    the planner's best placement and for every block linear on the NPU at W16A16, or None without the cost model.
    The output matmul runs all M rows on the CPU (verification needs every row's logits); the per-layer CPU work
    is taken as at decode, per pass."""
    try:
        from npulm.npu import cost as C
        from npulm.plan import Choice, Planner
    except ImportError:
        return None
    shape = C.ModelShape.from_gguf(path)
    pl = Planner(shape)
    plans = {"plan": pl.best(512, 128), "W16A16": {li: Choice("W16A16") for li in shape.linears}}

    def cost(choices):
        def seconds(m: int) -> float:
            t = sum(li.count * pl.linear_time(li, choices.get(li, Choice()), m) for li in shape.linears)
            return t + C.cpu_linear_time(pl.c, shape.output, m) + shape.n_layer * pl.c["cpu_layer_s"]
        return seconds

    return {name: cost(ch) for name, ch in plans.items()}


# --- llama.cpp side by side ------------------------------------------------------------------------------------------

def llama_cpp_rows(path: str, prompts: dict[str, list[int]], n: int, threads: int) -> dict[str, tuple[float, float]]:
    """llama-cpp-python, plain and with its LlamaPromptLookupDecoding, greedy: {task: (plain tok/s, lookup tok/s)}."""
    from llama_cpp import Llama as CppLlama
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    out = {}
    plain = CppLlama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    look = CppLlama(path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False,
                    draft_model=LlamaPromptLookupDecoding(num_pred_tokens=6))
    for name, toks in prompts.items():
        rates = []
        for llm in (plain, look):
            llm.reset()
            llm.eval(toks)  # prompt before the clock
            t0 = time.perf_counter()
            r = llm.create_completion(toks, max_tokens=n, temperature=0.0)
            rates.append(r["usage"]["completion_tokens"] / (time.perf_counter() - t0))
        out[name] = (rates[0], rates[1])
    return out


# --- main ------------------------------------------------------------------------------------------------------------

def gmean(xs: list[float]) -> float:
    return float(np.exp(np.mean(np.log(xs)))) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=f"{assets.SMOLLM2},{assets.GEMMA3}")
    ap.add_argument("-n", type=int, default=128, help="tokens generated per task")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--draft-max", type=int, default=16)
    ap.add_argument("--reps", type=int, default=15, help="passes per M for the pass-cost table (min taken)")
    ap.add_argument("--context", type=int, default=200, help="tokens in the cache before a timed pass")
    ap.add_argument("--rounds", type=int, default=3, help="plain / lookup runs per task, alternating (fastest kept)")
    ap.add_argument("--llama-cpp", action="store_true", help="llama-cpp-python plain vs its prompt lookup too")
    ap.add_argument("--no-board", action="store_true", help="skip the board-tuned lookup rerun")
    ap.add_argument("-ot", "--override-tensor", action="append", default=[], metavar="GLOB=TARGET",
                    help="per-tensor placement as `npulm run -ot` (e.g. '*=cpu:a8': int8 activations everywhere)")
    args = ap.parse_args(argv)
    ms = [1, 2, 4, 8]
    print("Speculative decoding (greedy), one run; the machine may be shared: read the ratios.\n")
    for name in args.models.split(","):
        path = str(assets.resolve_model(name))
        llm = Llama(path, n_ctx=max(2048, args.context + 64), n_threads=args.threads, verbose=False,
                    tensor_overrides=args.override_tensor)
        print(f"## {name} ({args.threads} threads)\n")
        here = {m: p["total"] for m, p in timed_passes(llm, ms, args.reps, args.context).items()}
        board = board_pass_cost(path)
        head = "| M | here ms | here / M=1 |"
        if board:
            head += " RK3588 best plan ms | / M=1 | RK3588 NPU W16A16 ms | / M=1 |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for m in ms:
            row = f"| {m} | {1e3 * here[m]:.2f} | {here[m] / here[1]:.2f} |"
            if board:
                for k in ("plan", "W16A16"):
                    row += f" {1e3 * board[k](m):.2f} | {board[k](m) / board[k](1):.2f} |"
            print(row)
        print()
        parts = pass_parts(llm, ms, args.reps, args.context)
        names = sorted({k for p in parts.values() for k in p} - {"attention", "rest", "total"}) + ["attention", "rest"]
        print("Where a pass goes, ms (and x its M = 1 time):\n")
        print("| M | " + " | ".join(names) + " | total |")
        print("|---|" + "---|" * (len(names) + 1))
        for m in ms:
            print(f"| {m} | " + " | ".join(f"{1e3 * parts[m].get(k, 0):.2f} ({parts[m].get(k, 0) / parts[1][k]:.1f})"
                                           if parts[1].get(k) else "-" for k in names)
                  + f" | {1e3 * parts[m]['total']:.2f} |")
        print()
        print("| set | task | tokens | plain tok/s | lookup tok/s | ratio | acceptance | tokens/pass | identical |"
              + (" board speed-up |" if board and not args.no_board else ""))
        print("|---|---|---|---|---|---|---|---|---|" + ("---|" if board and not args.no_board else ""))
        ratios: dict[str, list[float]] = {"grounded": [], "free": []}
        exact_rows(llm.model)  # the one-time probe of the model (as at a Llama's first speculative step), off the clock
        prompts = {}
        for task in tasks():
            group, tname, _ = task
            prompt = prompt_tokens(llm, task)
            prompts[tname] = prompt
            # plain and lookup alternate, the fastest of each kept: on a shared machine one slow moment would
            # otherwise decide a task's ratio
            t_plain = t_fast = float("inf")
            for _ in range(args.rounds):
                plain, t = decode(llm, prompt, args.n, None)
                t_plain = min(t_plain, t)
                spec = Speculator(PromptLookup(), draft_max=args.draft_max)
                fast, t = decode(llm, prompt, args.n, spec)
                t_fast = min(t_fast, t)
            s = spec.stats
            r = (len(fast) / t_fast) / (len(plain) / t_plain)
            ratios[group].append(r)
            row = (f"| {group} | {tname} | {len(plain)} | {len(plain) / t_plain:.1f} | {len(fast) / t_fast:.1f} | "
                   f"{r:.2f}x | {100 * s.acceptance:.0f} % | {s.tokens_per_pass:.2f} | {plain == fast} |")
            if board and not args.no_board:
                tuned = Speculator(PromptLookup(), draft_max=args.draft_max, pass_cost=board["plan"])
                decode(llm, prompt, args.n, tuned)
                t = tuned.stats
                priced = sum(count * board["plan"](m) for m, count in t.passes.items())
                row += f" {t.emitted * board['plan'](1) / priced:.2f}x |"
            print(row, flush=True)
        print(f"\ngeometric mean lookup / plain: input-grounded {gmean(ratios['grounded']):.2f}x, "
              f"free {gmean(ratios['free']):.2f}x (min {min(ratios['free']):.2f}x)\n")
        if args.llama_cpp:
            rows = llama_cpp_rows(path, prompts, args.n, args.threads)
            print("| llama-cpp-python | plain tok/s | LlamaPromptLookupDecoding tok/s | ratio |\n|---|---|---|---|")
            for tname, (a, b) in rows.items():
                print(f"| {tname} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
            print(f"\ngeometric mean: {gmean([b / a for a, b in rows.values()]):.2f}x\n")
        del llm
    print("No draft/target pair of one vocabulary ships in the assets (SmolLM2: 49152 tokens, Gemma-3: 262144): "
          "no draft-model row.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
