"""The token loop: a Session owns one sequence's cache and tokens; generate() yields sampled tokens; TextStream
turns them into text deltas, holding back bytes of incomplete UTF-8 and text that may begin a stop string;
stream_text() puts the two together for the API, the CLI and the server."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .models import Model
from .models.cache import cache_offset
from .sampling import Sampler
from .tokenizer import Tokenizer


class ContextOverflow(ValueError):
    """More tokens than the context window holds."""


def context_overflow(n: int, n_ctx: int) -> ContextOverflow:
    return ContextOverflow(f"Requested tokens ({n}) exceed context window of {n_ctx}")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """One sequence: the cache it owns (made by the model) and the tokens it holds. Reuses the longest common
    prefix between calls and rolls back by trimming the cache."""

    def __init__(self, model: Model, n_batch: int = 512):
        self.model, self.n_batch = model, max(1, n_batch)
        self.cache = model.make_cache()
        self.tokens: list[int] = []

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def reset(self) -> None:
        self.truncate(0)

    def truncate(self, n: int) -> None:
        """Keep the first n tokens (every layer of the cache forgets the rest)."""
        for layer in self.cache:
            layer.trim(layer.offset - n)
        del self.tokens[min(n, cache_offset(self.cache)):]  # a recurrent state (RWKV) forgets all it cannot step back

    def eval(self, tokens: Sequence[int], logits_from: int = -1) -> np.ndarray:
        """Append tokens to the sequence; logits of rows logits_from.. of this call (default: the last)."""
        tokens = list(tokens)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise context_overflow(len(self.tokens) + len(tokens), self.n_ctx)
        if logits_from < 0:
            logits_from += len(tokens)
        outs = []
        for start in range(0, len(tokens), self.n_batch):  # prefill in batches of n_batch
            piece = tokens[start:start + self.n_batch]
            lf = max(logits_from - start, 0)
            try:
                logits = self.model.forward(piece, self.cache, logits_from=min(lf, len(piece)))
            except BaseException:  # a failed pass may have filled some layers: back to the tokens held
                self.truncate(len(self.tokens))
                raise
            self.tokens.extend(piece)
            if len(logits):
                outs.append(logits)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `prompt`, evaluating only what differs; logits of its last token."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.n_ctx:
            raise context_overflow(len(prompt), self.n_ctx)
        self.truncate(common_prefix(self.tokens, prompt[:-1]))  # at least the last prompt token is evaluated
        return self.eval(prompt[len(self.tokens):])[-1]


def plain_step(session: Session, token: int, sampler: Sampler) -> list[int]:
    """One decode step: evaluate the last emitted token, sample the next."""
    return [sampler(session.eval([token])[-1], session.tokens)]


def generate(session: Session, prompt: Sequence[int], sampler: Sampler, max_tokens: int | None,
             stop_ids: Iterable[int], speculator=None) -> Iterator[int]:
    """Yield sampled tokens until an end-of-generation token, max_tokens or a full context (an EOG token is not
    yielded). A step evaluates the last emitted token and returns the next ones: one (plain decode) or, with a
    `speculator` (npulm.speculative), up to k+1 verified in one pass. On return the session holds the prompt and
    every yielded token but the last (the last too after an EOG), whichever the steps."""
    stop_ids = set(stop_ids)
    step = plain_step if speculator is None else speculator.step
    limit = max_tokens if max_tokens and max_tokens > 0 else None
    out = [sampler(session.prefill(prompt), session.tokens)]
    base = len(session.tokens)  # position of out[0]; the session holds out[:-1] after it
    n = held = 0
    try:
        while True:
            for i, token in enumerate(out):
                held = base + i  # what plain decoding holds here: everything before this token
                if token in stop_ids:
                    return
                yield token
                n += 1
                if (limit and n >= limit) or held >= session.n_ctx:
                    return
            base += len(out)
            out = step(session, out[-1], sampler)
    finally:  # a step may have verified tokens past the end (or the consumer stopped early)
        session.truncate(held)


class StopStrings:
    """Accumulates text deltas and cuts at the first stop string, releasing only text that cannot start one."""

    def __init__(self, stop: Sequence[str]):
        self.stop = [s for s in stop if s]
        self.pending = ""
        self.hit = False

    def feed(self, delta: str) -> str:
        self.pending += delta
        for s in self.stop:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending, self.hit = self.pending[:i], "", True
                return out
        hold = 0  # longest suffix of pending that is a prefix of a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class TextStream:
    """Generated tokens -> text deltas: the tokenizer's incremental decoder (incomplete UTF-8 held back) followed by
    the stop strings. `hit` tells that a stop string ended the text."""

    def __init__(self, tokenizer: Tokenizer, stop: str | Sequence[str] | None = None):
        self.decoder = tokenizer.stream()
        self.stops = StopStrings([stop] if isinstance(stop, str) else list(stop or []))

    @property
    def hit(self) -> bool:
        return self.stops.hit

    def feed(self, token: int) -> str:
        return self.stops.feed(self.decoder.add(token))

    def flush(self) -> str:
        return self.stops.feed(self.decoder.flush()) + self.stops.flush()


def stream_text(session: Session, tokenizer: Tokenizer, prompt: Sequence[int], sampler: Sampler,
                max_tokens: int | None = None, stop: str | Sequence[str] | None = None, speculator=None
                ) -> Iterator[tuple[str, str | None, int]]:
    """Generate after `prompt` as text: (delta, finish_reason or None, completion tokens so far). The last item
    carries the finish reason: "stop" (an end-of-generation token or a stop string) or "length" (max_tokens or a full
    context)."""
    if len(prompt) >= session.n_ctx:
        raise context_overflow(len(prompt), session.n_ctx)
    text = TextStream(tokenizer, stop)
    limit = max_tokens if max_tokens and max_tokens > 0 else None
    n = 0
    for token in generate(session, prompt, sampler, limit, tokenizer.eog_ids, speculator):
        n += 1
        delta = text.feed(token)
        if text.hit:
            yield delta, "stop", n
            return
        if delta:
            yield delta, None, n
    reason = "length" if (limit and n >= limit) or len(session.tokens) >= session.n_ctx else "stop"
    yield text.flush(), reason, n
