"""Per-token cost of npulm's sampler chain on real logits, against the same chain on a full float64 copy of the
vocabulary (how npulm sampled before the pooled hot path), and against a decode step, in one run:

    python benchmarks/sampling.py [--models smollm2-135m gemma3-270m] [--tokens 64]

Logits are the model's own at every position of a lee_background passage (logits_all), so the distributions are
real ones. The machine's load average is printed: on a shared machine every figure is noisy; compare ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from npulm import assets  # noqa: E402
from npulm.api import Llama  # noqa: E402
from npulm.sampling import SamplingParams, make_sampler, min_p, penalize, token_counts, top_k, top_p  # noqa: E402

CONFIGS = {
    "greedy": dict(temperature=0.0),
    "llama.cpp defaults (k40 p.95 minp.05 t.8)": dict(),
    "+ repeat 1.1, frequency .2, presence .2": dict(repeat_penalty=1.1, frequency_penalty=0.2, presence_penalty=0.2),
    "+ logit_bias, DRY 0.8": dict(repeat_penalty=1.1, logit_bias={13: -100.0}, dry_multiplier=0.8),
    "mirostat 2 (whole vocabulary)": dict(mirostat_mode=2),
}


def full_copy_chain(sp: SamplingParams, rng: np.random.Generator):
    """The chain on a float64 copy of every logit with an argpartition over the vocabulary."""
    def sample(logits: np.ndarray, history) -> int:
        lg = logits.astype(np.float64)
        ids, counts = token_counts(history, sp.repeat_last_n)
        lg[ids] = penalize(lg[ids], counts, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty)
        if sp.temperature <= 0:
            return int(np.argmax(lg))
        c = min_p(top_p(top_k((np.arange(len(lg)), lg), sp.top_k), sp.top_p), sp.min_p)
        p = np.exp((c[1] - c[1].max()) / sp.temperature)
        return int(c[0][rng.choice(len(p), p=p / p.sum())])
    return sample


def per_token_us(sampler, rows: np.ndarray, history: list[int]) -> float:
    times = []
    for i, row in enumerate(rows):
        t0 = time.perf_counter()
        sampler(row, history[:len(history) - len(rows) + i + 1])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=[assets.SMOLLM2, assets.GEMMA3])
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; median us per token\n")
    print("| model (vocabulary) | sampler | pooled chain (us) | full-copy chain (us) | ratio "
          "| share of a decode step |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        llm = Llama(name, n_ctx=512, logits_all=True, verbose=False)
        tokens = llm.tokenize(assets.lee_background().read_text()[:4000])[:args.tokens + 64]
        llm.eval(tokens)
        rows = llm.scores[64:len(tokens)].copy()
        steps = []
        for i in range(10):
            t0 = time.perf_counter()
            llm.eval([tokens[i]])
            steps.append(time.perf_counter() - t0)
        step_us = statistics.median(steps) * 1e6
        for label, kw in CONFIGS.items():
            sp = SamplingParams(seed=0, **kw)
            pooled = per_token_us(make_sampler(sp, n_vocab=llm.n_vocab()), rows, tokens)
            full = per_token_us(full_copy_chain(sp, np.random.default_rng(0)), rows, tokens) \
                if not sp.mirostat_mode and not sp.dry_multiplier and not sp.logit_bias else float("nan")
            print(f"| {name} ({llm.n_vocab()}) | {label} | {pooled:.0f} | {full:.0f} | {full / pooled:.1f}x | "
                  f"{100 * pooled / step_us:.1f} % of {step_us / 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
