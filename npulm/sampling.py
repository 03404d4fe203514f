"""Samplers as small functions, chained in llama.cpp's order (common/sampling.cpp with its default `--samplers`):

    grammar mask -> logit bias -> penalties (repeat, frequency, presence) -> DRY
      -> top-k -> typical -> top-p -> min-p -> temperature -> draw
    with mirostat 1 or 2: ... DRY -> temperature -> mirostat (which truncates and draws itself)

temperature <= 0 is greedy: the argmax after mask, bias and penalties. A grammar mask goes first: llama.cpp
resamples with the grammar applied to the whole vocabulary whenever its first draw breaks the grammar, so masking
first gives the distribution it samples from.

Hot path: bias, penalties and DRY touch a handful of tokens, so they are computed for those ids only, and when top-k
cuts the vocabulary the chain runs on a pool of ids found with one compare over the vocabulary (every id whose raw
logit reaches a threshold that at least k untouched ids reach, plus the touched ids): no per-token copy, sort or
argpartition of the whole vocabulary. Without top-k (or with mirostat) the chain needs every token and takes a copy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

Candidates = tuple[np.ndarray, np.ndarray]  # (token ids, logits as float64)
Sampler = Callable[[np.ndarray, Sequence[int]], int]  # (logits of one position, tokens so far) -> token
DRY_BREAKERS = ("\n", ":", "\"", "*")  # llama.cpp's default DRY sequence breakers


class TokenConstraint(Protocol):
    """A constrained-decoding state (a grammar): which tokens may come next, advanced by each accepted token."""

    def allowed(self, n_vocab: int) -> np.ndarray | None:
        """Boolean mask over the vocabulary, or None when anything may follow."""

    def accept(self, token: int) -> None: ...


@dataclass
class SamplingParams:
    """llama-cpp-python's sampling keywords with its defaults; `check()` rejects bad values naming the parameter."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 64
    mirostat_mode: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    logit_bias: Mapping[int, float] | None = None
    seed: int | None = None
    min_keep: int = 1
    dry_breakers: Mapping[int, list[tuple[int, ...]]] = field(default_factory=dict)  # from dry_sequence_breakers()

    def check(self, n_vocab: int | None = None) -> SamplingParams:
        def bad(name: str, want: str) -> ValueError:
            return ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")

        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("float", "int") and (not isinstance(v, (int, float, np.number)) or isinstance(v, bool)):
                raise bad(f.name, "a number")
            if f.type == "float" and not math.isfinite(v):
                raise bad(f.name, "a finite number")
            if f.type == "int" and int(v) != v:
                raise bad(f.name, "an integer")
        if self.top_k < 0:
            raise bad("top_k", ">= 0 (0 disables it)")
        for name in ("top_p", "min_p", "typical_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise bad(name, "in [0, 1]")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty", "> 0 (1.0 disables it)")
        for name in ("repeat_last_n", "dry_penalty_last_n"):
            if getattr(self, name) < -1:
                raise bad(name, ">= -1 (-1: the whole context, 0: off)")
        if self.dry_multiplier < 0:
            raise bad("dry_multiplier", ">= 0 (0 disables DRY)")
        if self.dry_base < 1 and self.dry_multiplier > 0:
            raise bad("dry_base", ">= 1")
        if self.dry_allowed_length < 0:
            raise bad("dry_allowed_length", ">= 0")
        if self.mirostat_mode not in (0, 1, 2):
            raise bad("mirostat_mode", "0, 1 or 2")
        if self.mirostat_mode and (self.mirostat_tau <= 0 or self.mirostat_eta <= 0):
            raise bad("mirostat_tau" if self.mirostat_tau <= 0 else "mirostat_eta", "> 0")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)):
            raise bad("seed", "an integer or None")
        if self.min_keep < 1:
            raise bad("min_keep", ">= 1")
        self.logit_bias = parse_logit_bias(self.logit_bias, n_vocab)
        return self


def parse_logit_bias(bias: Mapping | None, n_vocab: int | None = None) -> dict[int, float] | None:
    """{token id (int or a digit string, as OpenAI clients send): bias} checked; -inf bans a token."""
    if not bias:
        return None
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
    out = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: token id {k!r} is not an integer") from None
        if tok < 0 or (n_vocab is not None and tok >= n_vocab):
            raise ValueError(f"logit_bias: token id {tok} outside the vocabulary (0..{(n_vocab or 0) - 1})")
        if not isinstance(v, (int, float, np.number)) or math.isnan(v) or v == math.inf:
            raise ValueError(f"logit_bias: bias {v!r} of token {tok} must be a number (or -inf)")
        out[tok] = float(v)
    return out


# --- penalties: computed for the touched ids only ---------------------------------------------------------------

def apply_repeat_penalty(logits: np.ndarray, history: Sequence[int], penalty: float, last_n: int = 64) -> np.ndarray:
    """llama.cpp's repetition penalty over the last `last_n` tokens: positive logits divided, negative multiplied."""
    ids, counts = token_counts(history, last_n)
    if penalty == 1.0 or not len(ids):
        return logits
    logits = logits.copy()
    logits[ids] = penalize(logits[ids].astype(np.float64), counts, penalty, 0.0, 0.0)
    return logits


def token_counts(history: Sequence[int], last_n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, occurrences) over the last `last_n` tokens (-1: all of them, 0: none)."""
    if last_n == 0 or not len(history):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    recent = history[-last_n:] if last_n > 0 else history
    return np.unique(np.asarray(recent, dtype=np.int64), return_counts=True)


def penalize(values: np.ndarray, counts: np.ndarray, repeat: float, frequency: float, presence: float) -> np.ndarray:
    """llama.cpp's penalties sampler on the logits of tokens seen `counts` times (counts > 0)."""
    values = np.where(values <= 0, values * repeat, values / repeat)
    return values - counts * frequency - (counts > 0) * presence


def dry_sequence_breakers(token_texts: Sequence[str], breakers: Sequence[str], encode: Callable[[str], list[int]],
                          max_tail: int = 20) -> dict[int, list[tuple[int, ...]]]:
    """llama.cpp's DRY breaker table: head token -> token tails that complete a breaker string. A token containing a
    breaker is a single-token breaker (empty tail); one ending in a breaker's prefix is followed by the rest's tokens.
    Scans the vocabulary once (cache the result per model)."""
    out: dict[int, list[tuple[int, ...]]] = {}
    for s in breakers:
        s = s[:40]  # llama.cpp truncates breakers to 40 characters
        if not s:
            continue
        for tok, word in enumerate(token_texts):
            if s in word:
                out.setdefault(tok, []).append(())
                continue
            pos = word.find(s[0])
            while pos >= 0:
                n = len(word) - pos
                if n < len(s) and word[pos:] == s[:n]:
                    tail = tuple(encode(s[n:])[:max_tail])
                    if tail not in out.setdefault(tok, []):
                        out[tok].append(tail)
                pos = word.find(s[0], pos + 1)
    return out


def dry_penalties(history: Sequence[int], multiplier: float, base: float, allowed_length: int, last_n: int,
                  breakers: Mapping[int, list[tuple[int, ...]]]) -> dict[int, float]:
    """DRY ("don't repeat yourself", llama.cpp's port of koboldcpp's): the penalty for each token that would extend
    a repetition of the recent context longer than `allowed_length`: multiplier * base ** (length - allowed)."""
    if multiplier == 0.0 or base < 1.0 or last_n == 0:
        return {}
    last = list(history[-last_n:] if last_n > 0 else history)
    n = len(last)
    if n <= allowed_length:
        return {}

    def rat(i: int) -> int:  # i-th token from the end
        return last[n - 1 - i]

    rep_limit = n  # 1. a breaker in the context bounds how far back a repetition may reach
    for i in range(n):
        longest = -1
        for tail in breakers.get(rat(i), ()):
            if longest < len(tail) <= i and all(tail[o] == rat(i - o - 1) for o in range(len(tail))):
                longest = len(tail)
        if longest >= 0:
            rep_limit = i - longest
            break
    if rep_limit < allowed_length:
        return {}
    repeat = [0] * n  # 2. reversed Z-algorithm: length of the suffix repeated ending at each position
    lt = rt = 0
    for k in range(1, n):
        if k > rt:
            m = 0
            while m + k < n and rat(m) == rat(m + k):
                m += 1
            repeat[n - 1 - k] = min(m, rep_limit)
            if m > 0:
                lt, rt = k, k + m - 1
        elif repeat[n - 1 - (k - lt)] < rt - k + 1:
            repeat[n - 1 - k] = min(repeat[n - 1 - (k - lt)], rep_limit)
        else:
            i = rt + 1
            while i < n and rat(i) == rat(i - k):
                i += 1
            repeat[n - 1 - k] = min(i - k, rep_limit)
            lt, rt = k, i - 1
    longest_before: dict[int, int] = {}  # 3. the token after each repeat would extend it
    for i in range(n - 1):
        if repeat[i] >= allowed_length:
            tok = rat(n - 2 - i)
            longest_before[tok] = max(longest_before.get(tok, -1), repeat[i])
    max_exp = int(88.7228391 / math.log(base)) if base > 1.000001 else 0  # 4. penalties, clamped below float max
    out = {}
    for tok, length in longest_before.items():
        if () in breakers.get(tok, ()):
            continue
        e = length - allowed_length
        out[tok] = multiplier * base ** (min(e, max_exp) if max_exp > 0 else e)
    return out


# --- truncation: each takes and returns candidates ---------------------------------------------------------------

def softmax(lg: np.ndarray) -> np.ndarray:
    p = np.exp(lg - lg.max())
    return p / p.sum()


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """log softmax of the model's logits: the chosen token's value and the k most likely (before sampling filters,
    as OpenAI reports them)."""
    z = logits.astype(np.float64)
    z -= z.max()
    lp = z - np.log(np.exp(z).sum())
    top: list[tuple[int, float]] = []
    if k > 0:
        idx = np.argpartition(-lp, min(k, len(lp) - 1))[:k]
        idx = idx[np.argsort(-lp[idx], kind="stable")]
        top = [(int(i), float(lp[i])) for i in idx]
    return float(lp[token]), top


def top_k(c: Candidates, k: int) -> Candidates:
    ids, lg = c
    if k <= 0 or k >= len(ids):
        return c
    keep = np.argpartition(-lg, k - 1)[:k]
    return ids[keep], lg[keep]


def typical(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Locally typical sampling: tokens whose surprise is closest to the entropy, up to probability mass p."""
    if p >= 1.0:
        return c
    ids, lg = c
    probs = softmax(lg)
    logp = np.log(np.maximum(probs, 1e-300))
    order = np.argsort(np.abs(-logp - (-(probs * logp).sum())), kind="stable")
    cum = np.cumsum(probs[order])
    over = np.flatnonzero(cum > p)
    n = len(ids)
    for i in over:  # first index past p that also keeps min_keep tokens
        if i >= min_keep - 1:
            n = int(i) + 1
            break
    return ids[order[:n]], lg[order[:n]]


def top_p(c: Candidates, p: float, min_keep: int = 1) -> Candidates:
    """Smallest set of most likely tokens whose probability mass reaches p. Like llama.cpp, tries the best 256 of a
    large set before sorting all of it."""
    if p >= 1.0:
        return c
    ids, lg = c
    w = np.exp(lg - lg.max())
    total = w.sum()
    for head in ((256, len(ids)) if len(ids) > 1024 else (len(ids),)):
        order = np.argpartition(-lg, head - 1)[:head] if head < len(ids) else np.arange(len(ids))
        order = order[np.argsort(-lg[order], kind="stable")]
        cum = np.cumsum(w[order]) / total
        reached = np.flatnonzero(cum >= p)
        reached = reached[reached + 1 >= min_keep]
        if len(reached):
            n = int(reached[0]) + 1
            return ids[order[:n]], lg[order[:n]]
    return ids[order], lg[order]


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
    probs = softmax(lg / temperature)
    return int(ids[rng.choice(len(ids), p=probs)])


class Mirostat:
    """Mirostat v1 and v2 (llama.cpp's): truncate to hold the surprise near tau, draw, move mu by eta."""

    def __init__(self, version: int, tau: float, eta: float, m: int = 100):
        self.version, self.tau, self.eta, self.m = version, tau, eta, m
        self.mu = 2.0 * tau

    def __call__(self, c: Candidates, n_vocab: int, rng: np.random.Generator) -> int:
        ids, lg = c
        probs = softmax(lg)
        if self.version == 1:  # estimate the Zipf exponent from the top m tokens, choose k from it and mu
            head = min(len(ids), self.m)
            order = np.argpartition(-lg, head - 1)[:head] if head < len(ids) else np.arange(len(ids))
            order = order[np.argsort(-lg[order], kind="stable")]
            p = probs[order]
            t = np.log(np.arange(2, head + 1) / np.arange(1, head))
            b = np.log(p[:-1] / p[1:])
            s_hat = float((t * b).sum() / (t * t).sum()) if head > 1 else 1.0
            eps = s_hat - 1
            k = max(int((eps * 2.0 ** self.mu / (1 - n_vocab ** -eps)) ** (1 / s_hat)), 1) if eps else 1
            ids, lg = top_k(c, k)
        else:  # keep the tokens whose surprise is at most mu
            keep = probs >= 2.0 ** -self.mu
            if not keep.any():
                keep = probs == probs.max()
            ids, lg = ids[keep], lg[keep]
        probs = softmax(lg)
        i = rng.choice(len(ids), p=probs)
        self.mu -= self.eta * (-math.log2(probs[i]) - self.tau)
        return int(ids[i])


# --- the chain -------------------------------------------------------------------------------------------------

def _touched(logits: np.ndarray, history: Sequence[int], sp: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Ids whose logits bias, penalties or DRY change, and their new logits (float64), in llama.cpp's order."""
    bias = sp.logit_bias or {}
    penal = sp.repeat_penalty != 1.0 or sp.frequency_penalty != 0.0 or sp.presence_penalty != 0.0
    seen, counts = token_counts(history, sp.repeat_last_n) if penal else (np.zeros(0, np.int64),) * 2
    dry = dry_penalties(history, sp.dry_multiplier, sp.dry_base, sp.dry_allowed_length, sp.dry_penalty_last_n,
                        sp.dry_breakers) if sp.dry_multiplier > 0 else {}
    if not bias and not len(seen) and not dry:
        return seen, np.zeros(0)
    seen_ok = seen < len(logits)
    seen, counts = seen[seen_ok], counts[seen_ok]
    ids = np.union1d(np.union1d(np.fromiter(bias, np.int64, len(bias)), seen), np.fromiter(dry, np.int64, len(dry)))
    vals = logits[ids].astype(np.float64)
    if bias:
        vals += np.array([bias.get(int(t), 0.0) for t in ids])
    if len(seen):
        at = np.searchsorted(ids, seen)
        vals[at] = penalize(vals[at], counts, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty)
    if dry:
        vals -= np.array([dry.get(int(t), 0.0) for t in ids])
    return ids, vals


def _pool(logits: np.ndarray, k: int, touched: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """Sorted ids that surely hold the k largest adjusted logits: the allowed ids whose raw logit reaches a threshold
    that at least k untouched allowed ids reach, plus the touched ids. The threshold comes from a strided sample."""
    n = len(logits)
    step = n // 2048
    if step >= 2:
        sample = logits[::step]
        j = min(len(sample), 2 * ((k + len(touched)) // step + 1) + 8)
        t = np.partition(sample, len(sample) - j)[len(sample) - j]
        sel = logits >= t
        if allowed is not None:
            sel &= allowed
        ids = np.flatnonzero(sel)
        if not len(touched):
            if len(ids) >= k:
                return ids
        elif len(ids) - np.isin(touched, ids, assume_unique=True).sum() >= k:
            return np.union1d(ids, touched)
    ids = np.flatnonzero(allowed) if allowed is not None else np.arange(n)
    return np.union1d(ids, touched) if len(touched) else ids


_top_k, _top_p, _min_p = top_k, top_p, min_p  # make_sampler's keywords shadow the names


def make_sampler(temperature: float | SamplingParams = 0.8, top_k: int = 40, top_p: float = 0.95,
                 min_p: float = 0.05, repeat_penalty: float = 1.0, repeat_last_n: int = 64, seed: int | None = None,
                 *, constraint: TokenConstraint | None = None, n_vocab: int | None = None, **params) -> Sampler:
    """A sampler from SamplingParams (or its fields as keywords, the first ones positional as before); seed None or
    negative draws from OS entropy. `constraint` (a grammar) masks the tokens it forbids and accepts the drawn one."""
    if isinstance(temperature, SamplingParams):
        sp = temperature
    else:
        sp = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, seed=seed, **params)
    sp.check(n_vocab)
    rng = np.random.default_rng(None if sp.seed is None or sp.seed < 0 else sp.seed)
    mirostat = Mirostat(sp.mirostat_mode, sp.mirostat_tau, sp.mirostat_eta) if sp.mirostat_mode else None
    greedy = sp.temperature <= 0

    def sample(logits: np.ndarray, history: Sequence[int] = ()) -> int:
        allowed = constraint.allowed(len(logits)) if constraint is not None else None
        ids_t, vals_t = _touched(logits, history, sp)
        if greedy and allowed is None and not len(ids_t):
            token = int(np.argmax(logits))
        else:
            token = _sample(logits, allowed, ids_t, vals_t)
        if constraint is not None:
            constraint.accept(token)
        return token

    def _prepare(logits: np.ndarray, allowed: np.ndarray | None, ids_t: np.ndarray, vals_t: np.ndarray
                 ) -> Candidates:
        k = 1 if greedy else sp.top_k
        if mirostat is None and 0 < k < len(logits):
            ids = _pool(logits, k, ids_t, allowed)
            lg = logits[ids].astype(np.float64)
        else:  # the whole vocabulary takes part
            ids, lg = np.arange(len(logits)), logits.astype(np.float64)
            if allowed is not None:
                lg[~allowed[:len(logits)]] = -np.inf
        if len(ids_t):
            lg[np.searchsorted(ids, ids_t)] = vals_t
        if allowed is not None:
            ok = allowed[ids]
            ids, lg = ids[ok], lg[ok]
        finite = np.isfinite(lg)
        if not finite.any():
            raise ValueError("every token is banned (logit_bias / grammar leave nothing to sample)")
        if not finite.all():
            ids, lg = ids[finite], lg[finite]
        return ids, lg

    def _truncate(c: Candidates) -> Candidates:
        c = _top_k(c, sp.top_k)
        c = typical(c, sp.typical_p, sp.min_keep)
        c = _top_p(c, sp.top_p, sp.min_keep)
        return _min_p(c, sp.min_p, sp.min_keep)

    def _sample(logits: np.ndarray, allowed: np.ndarray | None, ids_t: np.ndarray, vals_t: np.ndarray) -> int:
        ids, lg = _prepare(logits, allowed, ids_t, vals_t)
        if greedy:
            return int(ids[np.argmax(lg)])
        if mirostat is not None:
            return mirostat((ids, lg / sp.temperature), len(logits), rng)
        return draw(_truncate((ids, lg)), sp.temperature, rng)

    def distribution(logits: np.ndarray, history: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray] | None:
        """The (token ids, probabilities) `sample` draws from, for speculative sampling; None where a draw is not one
        from a fixed distribution (greedy, mirostat, a constraint's state)."""
        if greedy or mirostat is not None or constraint is not None:
            return None
        ids, lg = _truncate(_prepare(logits, None, *_touched(logits, history, sp)))
        return ids, softmax(lg / sp.temperature)

    sample.params = sp  # type: ignore[attr-defined]
    sample.rng = rng  # type: ignore[attr-defined]
    sample.distribution = distribution  # type: ignore[attr-defined]
    return sample
