"""Quality measures: perplexity with llama-perplexity's method, and KL divergence / top-1 against reference logits."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

import numpy as np
from tqdm import tqdm


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class Perplexity:
    nll: list[float] = field(default_factory=list)  # negative log-likelihood of every scored token
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk

    @property
    def ppl(self) -> float:
        return math.exp(float(np.mean(self.nll)))

    @property
    def stderr(self) -> float:
        """llama-perplexity's +/-: sqrt(var(nll) / (n-1)) * PPL."""
        a = np.asarray(self.nll, np.float64)
        if len(a) < 2:
            return float("nan")
        return math.sqrt(max(float(np.mean(a * a) - np.mean(a) ** 2), 0.0) / (len(a) - 1)) * self.ppl


def perplexity(eval_chunk: Callable[[list[int], int], np.ndarray], tokens: list[int], n_ctx: int = 512,
               n_chunks: int | None = None, bos_id: int | None = None, progress: bool = True,
               out: TextIO | None = sys.stderr) -> Perplexity:
    """Perplexity as llama-perplexity computes it.

    The text is tokenized whole (with BOS if the vocabulary adds one) and cut into floor(len/n_ctx) chunks. Each
    chunk is evaluated from an empty cache; if `bos_id` is given, its first token is replaced by BOS. Only the second
    half is scored: positions first=n_ctx/2 .. n_ctx-2 predict the next token (n_ctx/2 - 1 tokens per chunk).
    `eval_chunk(tokens, first)` returns logits for positions first..n_ctx-1 of a fresh sequence.
    """
    available = len(tokens) // n_ctx
    if available < 1:
        raise ValueError(f"need at least {n_ctx} tokens for -c {n_ctx}, the text has {len(tokens)}")
    n = available if not n_chunks or n_chunks < 0 else min(n_chunks, available)
    first = n_ctx // 2
    result = Perplexity()
    bar = tqdm(range(n), desc="perplexity", unit="chunk", disable=not progress, file=sys.stderr)
    for i in bar:
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        logp = log_softmax(eval_chunk(chunk, first)[: n_ctx - 1 - first])
        targets = np.asarray(chunk[first + 1:], dtype=np.int64)
        result.nll.extend((-logp[np.arange(len(targets)), targets]).tolist())
        result.chunk_ppl.append(result.ppl)
        bar.set_postfix(ppl=f"{result.ppl:.4f}")
        if out is not None and not progress:
            print(f"[{i + 1}]{result.ppl:.4f},", end=" ", file=out, flush=True)
    if out is not None and not progress:
        print(file=out)
    return result


@dataclass
class Divergence:
    kl: np.ndarray  # per position KL(reference || candidate)
    top1: np.ndarray  # per position: argmax agrees

    @property
    def mean_kl(self) -> float:
        return float(self.kl.mean())

    @property
    def top1_rate(self) -> float:
        return float(self.top1.mean())


def divergence(reference_logits: np.ndarray, logits: np.ndarray) -> Divergence:
    """Per-position KL(reference || candidate) and top-1 agreement of two (n, vocab) logit arrays."""
    lp, lq = log_softmax(reference_logits), log_softmax(logits)
    kl = (np.exp(lp) * (lp - lq)).sum(axis=-1)
    return Divergence(kl, reference_logits.argmax(axis=-1) == logits.argmax(axis=-1))
