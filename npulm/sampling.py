"""Samplers as small composable functions, applied in llama.cpp's default order:
repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw. temperature <= 0 is greedy (argmax).

Filters work on a candidate set (token ids, logits) so that later steps touch only what survived top-k.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Candidates = tuple[np.ndarray, np.ndarray]  # (token ids, logits as float64)
Sampler = Callable[[np.ndarray, Sequence[int]], int]  # (logits of one position, tokens so far) -> token


def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int = 64) -> np.ndarray:
    """llama.cpp's repetition penalty over the last `last_n` tokens: positive logits divided, negative multiplied."""
    if penalty == 1.0 or not len(history) or last_n == 0:
        return logits
    recent = np.unique(np.asarray(history[-last_n:] if last_n > 0 else history, dtype=np.int64))
    logits = logits.copy()
    vals = logits[recent]
    logits[recent] = np.where(vals > 0, vals / penalty, vals * penalty)
    return logits


def top_k(c: Candidates, k: int) -> Candidates:
    ids, lg = c
    if k <= 0 or k >= len(ids):
        return c
    keep = np.argpartition(-lg, k - 1)[:k]
    return ids[keep], lg[keep]


def _sorted_probs(c: Candidates) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids, lg = c
    order = np.argsort(-lg, kind="stable")
    p = np.exp(lg[order] - lg[order[0]])
    return ids[order], lg[order], p / p.sum()


def top_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return c
    ids, lg, probs = _sorted_probs(c)
    n = int(np.searchsorted(np.cumsum(probs), p) + 1)
    n = max(min_keep, min(n, len(ids)))
    return ids[:n], lg[:n]


def min_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Tokens whose probability is at least p times the most likely token's."""
    if p <= 0.0:
        return c
    ids, lg = c
    keep = lg >= lg.max() + np.log(p)
    if keep.sum() < min_keep:
        return top_k(c, min_keep)
    return ids[keep], lg[keep]


def draw(c: Candidates, temperature: float, rng: np.random.Generator) -> int:
    ids, lg = c
    z = (lg - lg.max()) / temperature
    probs = np.exp(z)
    probs /= probs.sum()
    return int(ids[rng.choice(len(ids), p=probs)])


def make_sampler(temperature: float = 0.8, top_k_: int = 40, top_p_: float = 0.95, min_p_: float = 0.05,
                 repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None) -> Sampler:
    """A sampler with llama.cpp's defaults; seed None or -1 draws from OS entropy."""
    rng = np.random.default_rng(None if seed is None or seed < 0 else seed)

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:
        logits = apply_repeat_penalty(logits, history, repeat_penalty, repeat_last_n)
        if temperature <= 0:
            return int(np.argmax(logits))
        c: Candidates = (np.arange(len(logits)), logits.astype(np.float64))
        c = top_k(c, top_k_)
        c = top_p(c, top_p_)
        c = min_p(c, min_p_)
        return draw(c, temperature, rng)

    return sample
