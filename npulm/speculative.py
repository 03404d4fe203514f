"""Speculative decoding: guess the next tokens cheaply, verify them with the target model in ONE pass of M = k+1
tokens, keep the agreed prefix and roll the cache back past the rest (a counter move, no recomputation).

Decode at M=1 streams every weight once per token; a pass over a few more rows costs little more (on the NPU about
the same for M = 1-8), so each accepted guess is a token almost for free. Two drafters:
  * `PromptLookup`: n-gram lookup in the prompt and the text so far (llama.cpp's llama-lookup, llama-cpp-python's
    LlamaPromptLookupDecoding): no second model; strong on input-grounded work (editing, extraction, code).
  * `DraftModel`: a small GGUF of the target's vocabulary (llama.cpp's -md / --draft-max / --draft-min /
    --draft-p-min), with its own cache; it may run on the CPU while the target verifies on the NPU.

Exactness. A verify pass runs the rows through the same kernels as single-token decode (`exact_rows`), so its
logits are bit-identical to plain decoding's. The acceptance rule is the standard speculative-sampling one: a draft
x proposed with probability q(x) is kept with probability min(1, p(x) / q(x)); on rejection the token is drawn from
norm(max(p - q, 0)). For a deterministic proposal (lookup, a greedy draft) q is a point mass, and the rule is
exactly "draw x' from p, keep the draft iff x' == x, else emit x'": each emitted token is the target sampler's own
draw, so greedy output is byte-identical and a seeded sampler draws the same tokens as without drafts. A draft model
sampling its proposals from its own distribution (temperature > 0) uses the general rule with the sampler's final
distribution (`sampling.make_sampler(...).distribution`).

Draft length adapts (`DraftLength`): from the observed acceptance rate and the cost of an M-token pass (measured
here, or a modeled cost such as the NPU's), it picks the k that maximizes expected tokens per second, and k = 0
(plain decode) when no k beats it.

The decoding step is a function of (session, sampler, drafter) so a server slot can call it: `Speculator.step`, or
its parts `propose` -> one forward pass (possibly batched with other sequences) -> `accept` + `Session.truncate`.
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .generate import Session, plain_step
from .models import Model
from .models.cache import KVCache
from .placement import Placement
from .sampling import Sampler, softmax

Distribution = tuple[np.ndarray, np.ndarray]  # (token ids, probabilities summing to 1)


_EXACT_ROWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {limit: rows}, probed once
_PASS_SECONDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {rows: seconds of a verify pass}


def exact_rows(model: Model, limit: int = 16) -> int:
    """The largest pass (rows) whose logits are bit-identical, row by row, to single-token decode, probed on random
    activations once per kind of Linear (class, placement, type, shape): the CPU kernels' row path qualifies up to their
    packed-gemm switch, integer NPU pipelines quantize each row on its own, BLAS on float weights does not (a matrix
    product may sum in another order than a vector product). Attention is row-exact within the fused decode loop.
    Probed once per model (tens of ms): every Speculator of the model shares the answer."""
    known = _EXACT_ROWS.setdefault(model, {})
    if limit not in known:
        known[limit] = _probe_exact_rows(model, limit)
    return known[limit]


def _probe_exact_rows(model: Model, limit: int) -> int:
    from .models.blocks import DECODE_ROWS, _ops

    if _ops is None:  # numpy attention batches queries through BLAS
        return 1
    rows, rng, seen = min(limit, DECODE_ROWS), np.random.default_rng(0), set()
    for lin in model.linears:
        key = (type(lin), lin.runs_on, lin.type, lin.n_in, lin.n_out)
        if key in seen:
            continue
        seen.add(key)
        x = rng.standard_normal((rows, lin.n_in)).astype(np.float32)
        one = np.concatenate([lin(x[i:i + 1]) for i in range(rows)])
        for m in range(2, rows + 1):
            if not np.array_equal(lin(x[:m]), one[:m]):
                rows = m - 1
                break
        if rows == 1:
            break
    return rows


# --- drafters ----------------------------------------------------------------------------------------------------

@dataclass
class Draft:
    """Proposed tokens; `probs[i]` is the distribution token i was drawn from, or None for a deterministic pick."""

    tokens: list[int]
    probs: list[Distribution | None] = field(default_factory=list)
    key: Any = None  # the kind of draft, for acceptance statistics (lookup: the n-gram size that matched)

    def __post_init__(self) -> None:
        if not self.probs:
            self.probs = [None] * len(self.tokens)


class Drafter(Protocol):
    def draft(self, tokens: Sequence[int], n: int, sampler: Sampler | None = None) -> Draft:
        """Up to n tokens likely to follow `tokens` (the prompt and the text so far)."""


class PromptLookup:
    """Prompt lookup decoding: find the last n-gram of the text (longest first, max_ngram_size down to 1) earlier in
    the text and propose the tokens that followed it. The most recent earlier occurrence wins: in a rewrite it is
    where the copy is, in a repetition the latest variant. Same arguments as llama-cpp-python's
    LlamaPromptLookupDecoding. It indexes the text it last saw: one per sequence (each server slot has its own)."""

    cheap = True  # drafting costs next to nothing: draft first, then size the draft by what matched

    def __init__(self, max_ngram_size: int = 3, num_pred_tokens: int = 10):
        if max_ngram_size < 1 or num_pred_tokens < 1:
            raise ValueError("max_ngram_size and num_pred_tokens must be >= 1")
        self.max_ngram_size, self.num_pred_tokens = max_ngram_size, num_pred_tokens
        # n-gram -> where its latest occurrence with a token after it starts, over _seen: a step appends a few
        # tokens, so the index grows with them instead of searching the whole text again (a search of a few
        # hundred tokens with numpy cost ~0.1 ms a step, 2 % of a SmolLM2 decode step)
        self._seen: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def _update(self, tokens: Sequence[int]) -> list[int]:
        ids = tokens.tolist() if isinstance(tokens, np.ndarray) else list(tokens)
        seen = self._seen
        if len(ids) < len(seen) or ids[:len(seen)] != seen:  # another text, or rolled back past seen: rebuild
            seen, self._index = [], {}
        index = self._index
        # n-grams ending before the last token (each has a continuation), from where the index stopped
        for end in range(max(len(seen) - 1, 0), len(ids) - 1):
            for size in range(1, min(self.max_ngram_size, end + 1) + 1):
                index[tuple(ids[end + 1 - size:end + 1])] = end + 1 - size
        self._seen = ids
        return ids

    def draft(self, tokens: Sequence[int], n: int, sampler: Sampler | None = None) -> Draft:
        n = min(n, self.num_pred_tokens)
        if n <= 0 or len(tokens) < 2:
            return Draft([])
        ids = self._update(tokens)
        for size in range(min(self.max_ngram_size, len(ids) - 1), 0, -1):
            start = self._index.get(tuple(ids[-size:]))
            if start is not None:
                return Draft(ids[start + size:start + size + n], key=size)
        return Draft([])

    def __call__(self, input_ids: np.ndarray, /, **_: Any) -> np.ndarray:
        """llama-cpp-python's draft-model call: input ids -> proposed ids."""
        return np.asarray(self.draft(input_ids, self.num_pred_tokens).tokens, dtype=np.intc)


LlamaPromptLookupDecoding = PromptLookup  # llama-cpp-python's name


class CallableDrafter:
    """A llama-cpp-python-style draft model (any callable input_ids -> proposed ids) as a Drafter."""

    cheap = True  # as LlamaPromptLookupDecoding: called once per step with everything it may propose

    def __init__(self, fn: Callable[[np.ndarray], Iterable[int]]):
        self.fn = fn

    def draft(self, tokens: Sequence[int], n: int, sampler: Sampler | None = None) -> Draft:
        return Draft([int(t) for t in list(self.fn(np.asarray(tokens, dtype=np.intc)))[:max(n, 0)]])


class DraftModel:
    """A smaller model of the target's vocabulary drafting token by token in its own cache. Drafting stops early when
    the draft's top probability falls under p_min (llama.cpp's --draft-p-min). With a sampling target it draws its
    proposals from the target sampler's chain applied to its own logits (the general acceptance rule); greedy, it
    proposes its argmax."""

    def __init__(self, model: Model, p_min: float = 0.75, vocab: Sequence[str] | None = None, n_batch: int = 512):
        self.model, self.p_min, self.vocab = model, p_min, vocab  # vocab: token texts, to check against a target
        self.session = Session(model, n_batch)

    @classmethod
    def load(cls, path: str, p_min: float = 0.75, n_ctx: int = 4096, placement: Placement | None = None
             ) -> DraftModel:
        """A draft GGUF (file or known name), its matmuls on the CPU unless `placement` places them."""
        from . import assets
        from .gguf import GGUFFile
        from .models import load_model

        gguf = GGUFFile(str(assets.resolve_model(path)))
        model = load_model(gguf, n_ctx, placement)
        return cls(model, p_min, list(gguf.kv.get("tokenizer.ggml.tokens", [])))

    def draft(self, tokens: Sequence[int], n: int, sampler: Sampler | None = None) -> Draft:
        n = min(n, self.model.n_ctx - len(tokens))
        if n <= 0 or not tokens:
            return Draft([])
        distribution = getattr(sampler, "distribution", None)
        rng = getattr(sampler, "rng", None)
        history = list(tokens)
        logits = self.session.prefill(history)
        out = Draft([], [])
        for i in range(n):
            dist = distribution(logits, history) if distribution is not None and rng is not None else None
            if dist is None:  # deterministic proposal
                token, top = int(np.argmax(logits)), float(softmax(logits).max())
            else:
                ids, p = dist
                token, top = int(ids[rng.choice(len(ids), p=p)]), float(softmax(logits).max())
            if top < self.p_min:  # as llama.cpp: an unsure draft is not worth its rows
                break
            out.tokens.append(token)
            out.probs.append(dist)
            history.append(token)
            if i + 1 < n:
                logits = self.session.eval([token])[-1]
        return out


def check_vocab(target_tokens: Sequence[str], draft_tokens: Sequence[str]) -> None:
    """A draft must speak the target's vocabulary (llama.cpp allows sizes to differ by padding only)."""
    n = min(len(target_tokens), len(draft_tokens))
    if abs(len(target_tokens) - len(draft_tokens)) > 128:
        raise ValueError(f"draft model vocabulary ({len(draft_tokens)} tokens) does not match the target's "
                         f"({len(target_tokens)} tokens)")
    for i in range(n):
        if target_tokens[i] != draft_tokens[i]:
            raise ValueError(f"draft model vocabulary differs from the target's at token {i}: "
                             f"{draft_tokens[i]!r} vs {target_tokens[i]!r}")


# --- verification ------------------------------------------------------------------------------------------------

def _residual(p: Distribution, q: Distribution) -> Distribution:
    """norm(max(p - q, 0)) over the union of their supports."""
    ids = np.union1d(p[0], q[0])
    pp = np.zeros(len(ids))
    qq = np.zeros(len(ids))
    pp[np.searchsorted(ids, p[0])] = p[1]
    qq[np.searchsorted(ids, q[0])] = q[1]
    r = np.maximum(pp - qq, 0.0)
    total = r.sum()
    return (ids, r / total) if total > 0 else (ids, pp)


def _prob_of(d: Distribution, token: int) -> float:
    hit = np.flatnonzero(d[0] == token)
    return float(d[1][hit[0]]) if len(hit) else 0.0


def accept(logits: np.ndarray, draft: Draft, sampler: Sampler, history: list[int]) -> list[int]:
    """The tokens to emit after a verify pass: logits row i follows history + draft.tokens[:i]. Returns the accepted
    drafts followed by one token of the target's (the correction at the first rejection, or the bonus token after the
    last draft), so it always holds 1..k+1 tokens, each distributed exactly as the target samples it."""
    out: list[int] = []
    distribution = getattr(sampler, "distribution", None)
    for i, token in enumerate(draft.tokens):
        row = logits[i]
        q = draft.probs[i]
        p = distribution(row, history) if q is not None and distribution is not None else None
        if p is None:  # deterministic proposal: the target's own draw decides
            x = sampler(row, history)
            if x != token:
                return out + [x]
        else:  # proposal drawn from q: keep it with probability min(1, p/q), else draw from norm(max(p - q, 0))
            rng = sampler.rng  # type: ignore[attr-defined]
            if rng.random() * _prob_of(q, token) >= _prob_of(p, token):
                ids, r = _residual(p, q)
                return out + [int(ids[rng.choice(len(ids), p=r)])]
        out.append(token)
        history.append(token)
    return out + [sampler(logits[len(draft.tokens)], history)]


def verify(session: Session, token: int, draft: Draft, sampler: Sampler) -> list[int]:
    """One pass over [token, *drafts] (token: the last emitted, not yet in the cache), then the cache rolled back to
    hold token and the accepted drafts. Returns the emitted tokens (the last of them is not in the cache yet)."""
    n0 = len(session.tokens)
    return settle(session, n0, session.eval([token, *draft.tokens], logits_from=0), draft, sampler)


def settle(session: Any, n0: int, logits: np.ndarray, draft: Draft, sampler: Sampler) -> list[int]:
    """After a pass over [token, *drafts] with token at position n0 (a Session, a server slot: anything with
    `tokens` and `truncate`): the emitted tokens, and the cache rolled back to token + the accepted drafts."""
    out = accept(logits, draft, sampler, session.tokens[:n0 + 1])
    session.truncate(n0 + len(out))
    return out


# --- adaptive draft length -----------------------------------------------------------------------------------------

class DraftLength:
    """Picks the draft length k that maximizes expected tokens per second of a step:
        E(k) = 1 + a + ... + a^k tokens (a: per-token acceptance, a decayed average of what was observed, kept per
               draft kind: a lookup draft found by a 3-gram is far likelier right than one found by a 1-gram)
        cost(k) = pass(k + 1) + k * draft_token
    pass(M) is measured per M (wall time: the fastest seen, drifting up slowly; interpolated between measured M and
    extrapolated by their slope beyond), or given by `pass_cost`
    (seconds of an M-token pass: a modeled NPU). k = 0 is plain decode, chosen whenever nothing beats it; a one-token
    probe after `probe_every` plain steps of a kind keeps its acceptance estimate alive, and each probe of a kind that
    fails doubles that kind's wait (up to `probe_max` steps; a hit resets it): free text, where lookup drafts are
    rarely right, then pays almost nothing for them."""

    def __init__(self, k_max: int, k_min: int = 0, pass_cost: Callable[[int], float] | None = None,
                 decay: float = 0.9, probe_every: int = 16, probe_max: int = 256):
        self.k_max, self.k_min, self.pass_cost = k_max, k_min, pass_cost
        self.decay, self.probe_every, self.probe_max = decay, probe_every, probe_max
        self.counts: dict[Any, list[float]] = {}  # kind -> [accepted, tried], decayed
        self.plain_steps: dict[Any, int] = {}
        self.probe_wait: dict[Any, int] = {}  # kind -> plain steps before its next probe
        self.probing: set[Any] = set()  # kinds whose last draft was a probe
        self.longer_steps: dict[Any, int] = {}
        self.seconds: dict[int, float] = {}
        self.draft_token_s = 0.0

    PRIOR = (1.0, 3.0)  # (hits, tries) a kind starts from: 1/3, as strong as three tries (it must show it pays)

    def acceptance(self, key: Any = None) -> float:
        hits, tries = self.counts.get(key, self.PRIOR)
        return hits / tries

    def pass_seconds(self, m: int, measured: list[int] | None = None) -> float:
        """Seconds of an m-row pass; `measured`: sorted(self.seconds), when the caller asks for several m."""
        if self.pass_cost is not None:
            return self.pass_cost(m)
        if m in self.seconds:
            return self.seconds[m]
        if not self.seconds:
            return float(m)  # nothing measured yet: any proportional guess, k = 0 wins
        ms = sorted(self.seconds) if measured is None else measured
        i = bisect.bisect(ms, m)  # ms[i - 1] < m < ms[i]
        if 0 < i < len(ms):
            lo, hi = ms[i - 1], ms[i]
            w = (m - lo) / (hi - lo)
            return (1 - w) * self.seconds[lo] + w * self.seconds[hi]
        if i == 0:
            return self.seconds[ms[0]]
        # beyond the largest M measured: the slope of the last two measured, or (one point) as dear as M single
        # passes: unexplored sizes are reached by probes, not by guessing them cheap
        lo = ms[-1]
        if len(ms) == 1:
            return self.seconds[lo] * m / lo
        below = ms[-2]
        slope = (self.seconds[lo] - self.seconds[below]) / (lo - below)
        return self.seconds[lo] + max(slope, 0.0) * (m - lo)

    def choose(self, k_max: int | None = None, key: Any = None) -> int:
        top = self.k_max if k_max is None else min(self.k_max, k_max)
        # E(k) / cost(k) for every k (the class's formula), the acceptance and measured sizes looked up once a step
        a, measured = min(self.acceptance(key), 0.999), sorted(self.seconds)
        best, best_rate = 0, 1.0 / self.pass_seconds(1, measured)
        for k in range(max(self.k_min, 1), top + 1):
            r = (1 - a ** (k + 1)) / (1 - a) / (self.pass_seconds(k + 1, measured) + k * self.draft_token_s)
            if r > best_rate:
                best, best_rate = k, r
        if 0 < best < top:  # now and then the longest draft: a pass cost need not grow in step with M (on the CPU
            n = self.longer_steps.get(key, 0) + 1  # kernels it jumps and then flattens), and an M never chosen
            self.longer_steps[key] = 0 if n >= self.probe_every else n  # is never timed; sizes between two timed
            if n >= self.probe_every:  # ones are interpolated
                return top
        if best == 0 and top >= max(self.k_min, 1):
            n = self.plain_steps.get(key, 0) + 1
            # the first probes come early while only single-token passes have been timed
            wait = self.probe_wait.get(key, self.probe_every if len(self.seconds) > 1 else 4)
            self.plain_steps[key] = 0 if n >= wait else n
            if n >= wait:
                self.probing.add(key)
                return max(self.k_min, 1)
        return best

    def observe(self, m: int, seconds: float, proposed: int, accepted: int, draft_seconds: float = 0.0,
                key: Any = None) -> None:
        """A verify pass of m rows took `seconds`; `accepted` of `proposed` drafts (of kind `key`) were kept."""
        old = self.seconds.get(m)
        # a faster pass is taken at once, a slower one drifts in slowly: on a shared machine one pass delayed by
        # another process would otherwise make its M look dear, and an M not chosen again is never re-timed
        self.seconds[m] = seconds if old is None or seconds < old else 0.95 * old + 0.05 * seconds
        if proposed and key in self.probing:
            self.probing.discard(key)
            wait = self.probe_wait.get(key, self.probe_every)
            self.probe_wait[key] = self.probe_every if accepted else min(2 * wait, self.probe_max)
        if proposed:
            per = draft_seconds / proposed
            self.draft_token_s = per if not self.draft_token_s else 0.8 * self.draft_token_s + 0.2 * per
            c = self.counts.setdefault(key, list(self.PRIOR))
            c[0] = self.decay * c[0] + accepted
            c[1] = self.decay * c[1] + accepted + (accepted < proposed)  # tries: up to and including a rejection


@dataclass
class SpecStats:
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    passes: dict[int, int] = field(default_factory=dict)  # rows of a verify pass -> how many ran

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.steps if self.steps else 0.0


class Speculator:
    """A drafter, the draft-length controller and statistics: what a sequence (a Session, a server slot) needs to
    decode speculatively. Unless exact=False, a step verifies at most `exact_rows(model) - 1` drafts, so that its
    logits are bit-identical to plain decoding's (a model whose matmuls are not row-exact is not sped up)."""

    def __init__(self, drafter: Drafter, draft_max: int = 16, draft_min: int = 0,
                 pass_cost: Callable[[int], float] | None = None, adaptive: bool = True, exact: bool = True):
        self.drafter = drafter
        self.draft_max, self.draft_min = max(0, draft_max), max(0, draft_min)
        self.adaptive, self.exact = adaptive, exact
        self.length = DraftLength(self.draft_max, self.draft_min, pass_cost)
        self.stats = SpecStats()
        self._limit: dict[int, int] = {}  # id(model) -> most drafts a pass may verify

    def max_drafts(self, session: Session) -> int:
        """Most drafts a pass may verify for this session's model: 0 where its cache cannot step back by a few tokens
        (a recurrent state such as RWKV's forgets everything: rollback would mean recomputation)."""
        model = session.model
        if id(model) not in self._limit:
            if not all(isinstance(layer, KVCache) for layer in session.cache):
                self._limit[id(model)] = 0
            else:
                self._limit[id(model)] = min(self.draft_max, exact_rows(model) - 1) if self.exact else self.draft_max
        return self._limit[id(model)]

    def propose(self, session: Session, token: int, sampler: Sampler) -> Draft:
        room = min(session.n_ctx - len(session.tokens) - 1, self.max_drafts(session))  # token + drafts
        if room < max(self.draft_min, 1):
            return Draft([])
        context = [*session.tokens, token]
        if getattr(self.drafter, "cheap", False):  # draft first, then keep what its kind of draft is worth
            draft = self.drafter.draft(context, room, sampler)
            k = self.length.choose(min(room, len(draft.tokens)), draft.key) if self.adaptive else room
        else:
            k = self.length.choose(room) if self.adaptive else room
            draft = self.drafter.draft(context, k, sampler) if k > 0 else Draft([])
        if k < max(self.draft_min, 1) or len(draft.tokens) < max(self.draft_min, 1):
            return Draft([], key=draft.key)
        return Draft(draft.tokens[:k], draft.probs[:k], draft.key)

    def step(self, session: Session, token: int, sampler: Sampler) -> list[int]:
        """Draft, verify in one pass, roll back: the emitted tokens (1..k+1; the last is not in the cache)."""
        self.max_drafts(session)  # the one-time probe of the model stays off the drafting clock
        if self.length.pass_cost is None:  # pass times are the model's: every Speculator of it shares them
            self.length.seconds = _PASS_SECONDS.setdefault(session.model, {})
        t0 = time.perf_counter()
        draft = self.propose(session, token, sampler)
        t1 = time.perf_counter()
        # no draft: plain decode (no verification or rollback to pay for)
        out = verify(session, token, draft, sampler) if draft.tokens else plain_step(session, token, sampler)
        self.record(draft, len(out), time.perf_counter() - t1, t1 - t0)
        return out

    def record(self, draft: Draft, emitted: int, seconds: float, draft_seconds: float = 0.0) -> None:
        """A verified pass of the token and `draft` that emitted `emitted` tokens in `seconds` (the pass's, or a
        slot's share of a batched pass): teaches the draft-length controller and counts the statistics."""
        k = len(draft.tokens)
        self.length.observe(k + 1, seconds, k, emitted - 1, draft_seconds, draft.key)
        s = self.stats
        s.steps, s.proposed, s.accepted, s.emitted = s.steps + 1, s.proposed + k, s.accepted + emitted - 1, \
            s.emitted + emitted
        s.passes[k + 1] = s.passes.get(k + 1, 0) + 1



def make_speculator(draft: Any, tokenizer=None, n_ctx: int = 4096, draft_max: int = 16, draft_min: int = 0,
                    p_min: float = 0.75, pass_cost: Callable[[int], float] | None = None) -> Speculator:
    """A Speculator from what `Llama(draft_model=...)` accepts: a Speculator (as is), a drafter (PromptLookup,
    DraftModel), a draft GGUF path or known model name, an npulm Llama, or a llama-cpp-python-style callable. A draft
    model must share the target tokenizer's vocabulary."""
    if isinstance(draft, Speculator):
        return draft
    if isinstance(draft, (str, bytes)) or hasattr(draft, "__fspath__"):
        draft = DraftModel.load(str(draft), p_min=p_min, n_ctx=n_ctx)
    elif hasattr(draft, "model") and hasattr(draft, "tokenizer") and not hasattr(draft, "draft"):  # a Llama
        draft = DraftModel(draft.model, p_min=p_min, vocab=draft.tokenizer.tokens)
    if isinstance(draft, DraftModel) and draft.vocab is not None and tokenizer is not None:
        check_vocab(tokenizer.tokens, draft.vocab)
    if not hasattr(draft, "draft"):
        if not callable(draft):
            raise ValueError(f"draft_model must be a GGUF path, a drafter or a callable, not {type(draft).__name__}")
        draft = CallableDrafter(draft)
    return Speculator(draft, draft_max, draft_min, pass_cost)


# --- command line (llama.cpp's flag names) ---------------------------------------------------------------------------

SPEC_CHOICES = ("lookup",)


def add_arguments(p) -> None:
    """--spec lookup / -md FILE and the draft-length flags, for `npulm run`, `chat` and `bench`."""
    p.add_argument("--spec", choices=SPEC_CHOICES, default=None,
                   help="speculative decoding without a draft model: 'lookup' drafts by n-gram lookup in the prompt "
                        "and the text so far (llama-lookup)")
    p.add_argument("-md", "--model-draft", default=None, metavar="FILE",
                   help="draft model (same vocabulary as the target) for speculative decoding; runs on the CPU")
    p.add_argument("--draft-max", "--draft", "--draft-n", dest="draft_max", type=int, default=16,
                   help="most draft tokens a step verifies (capped where the kernels stop computing rows alone, "
                        "so output stays bit-exact: 15 with the packed CPU kernel, 6 with the rows kernel); "
                        "adapted from acceptance and pass cost")
    p.add_argument("--draft-min", type=int, default=0, help="least draft tokens worth a verify pass")
    p.add_argument("--draft-p-min", type=float, default=0.75,
                   help="a draft model stops drafting when its top probability falls under this")


def drafter_from_args(args) -> Any:
    """What Llama(draft_model=...) gets from the flags, or None."""
    if getattr(args, "model_draft", None) and getattr(args, "spec", None):
        raise ValueError("--spec lookup and --model-draft exclude each other: pick one drafter")
    if getattr(args, "model_draft", None):
        return args.model_draft
    if getattr(args, "spec", None) == "lookup":
        return PromptLookup()
    return None
