"""The token loop: a Session owns the KV cache position; generate() yields sampled tokens; stream_text() turns
them into text deltas, holding back bytes of incomplete UTF-8 and text that may begin a stop string."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .models import Model
from .sampling import Sampler


class ContextOverflow(ValueError):
    """More tokens than the context window holds."""


class Session:
    """A model plus the tokens its KV cache holds. Reuses the longest common prefix between calls."""

    def __init__(self, model: Model, n_batch: int = 512):
        self.model, self.n_batch = model, max(1, n_batch)
        self.tokens: list[int] = []

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def reset(self) -> None:
        self.tokens = []

    def eval(self, tokens: Sequence[int], logits_from: int = -1) -> np.ndarray:
        """Append tokens to the sequence; logits of rows logits_from.. of this call (default: the last)."""
        tokens = list(tokens)
        if len(self.tokens) + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"Requested tokens ({len(self.tokens) + len(tokens)}) exceed context window of "
                                  f"{self.n_ctx}")
        if logits_from < 0:
            logits_from += len(tokens)
        outs = []
        for start in range(0, len(tokens), self.n_batch):  # prefill in batches of n_batch
            piece = tokens[start:start + self.n_batch]
            lf = max(logits_from - start, 0)
            logits = self.model.forward(piece, len(self.tokens), logits_from=lf) if lf < len(piece) else None
            self.tokens.extend(piece)
            if logits is not None:
                outs.append(logits)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def prefill(self, prompt: Sequence[int]) -> np.ndarray:
        """Make the cache hold exactly `prompt`, evaluating only what differs; logits of its last token."""
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) > self.n_ctx:
            raise ContextOverflow(f"Requested tokens ({len(prompt)}) exceed context window of {self.n_ctx}")
        keep = 0
        for a, b in zip(self.tokens, prompt[:-1]):  # at least the last prompt token is evaluated
            if a != b:
                break
            keep += 1
        self.tokens = self.tokens[:keep]
        return self.eval(prompt[keep:])[-1]


def generate(session: Session, prompt: Sequence[int], sampler: Sampler, max_tokens: int | None,
             stop_ids: Iterable[int]) -> Iterator[int]:
    """Yield sampled tokens until an end-of-generation token, max_tokens or a full context.

    After the loop, `generate.finish_reason` style information is given by the caller: an EOG token is not yielded.
    """
    stop_ids = set(stop_ids)
    logits = session.prefill(prompt)
    n = 0
    while max_tokens is None or max_tokens <= 0 or n < max_tokens:
        token = sampler(logits, session.tokens)
        if token in stop_ids:
            return
        yield token
        n += 1
        if len(session.tokens) >= session.n_ctx:
            return
        logits = session.eval([token])[-1]


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
