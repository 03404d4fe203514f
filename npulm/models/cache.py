"""Per-sequence state, apart from the weights: the caller (a Session, a server slot, a speculative decoder) owns
a cache made by `Model.make_cache()`, a list with one per-layer cache.

A per-layer cache has `offset` (tokens held), `trim(n)` (forget the last n tokens, returning how many were
dropped) and `reset()`; attention layers use `KVCache`, other architectures may define their own state with the same
three members (mlx-lm's shape)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

KV_DTYPE = np.float16  # float32 works too (numpy attention only); tests use it to compare orderings exactly


class LayerCache(Protocol):
    offset: int

    def trim(self, n: int) -> int: ...

    def reset(self) -> None: ...


class KVCache:
    """Preallocated keys and values of one layer: (n_kv_heads, n_ctx, head_dim) each, float16 like llama.cpp's
    default cache type (half the memory of float32; on long contexts the cache outgrows a small model)."""

    def __init__(self, n_kv_heads: int, n_ctx: int, head_dim_k: int, head_dim_v: int, dtype=None):
        self.k = np.zeros((n_kv_heads, n_ctx, head_dim_k), dtype or KV_DTYPE)
        self.v = np.zeros((n_kv_heads, n_ctx, head_dim_v), dtype or KV_DTYPE)
        self.offset = 0

    @property
    def n_ctx(self) -> int:
        return self.k.shape[1]

    def append(self, k: np.ndarray, v: np.ndarray) -> int:
        """Write the keys / values of M new tokens, (M, n_kv, d) each, after those held; returns their first
        position."""
        pos, end = self.offset, self.offset + k.shape[0]
        if end > self.n_ctx:
            raise ValueError(f"context overflow: positions {pos}..{end - 1} exceed n_ctx={self.n_ctx}")
        self.k[:, pos:end] = k.transpose(1, 0, 2)
        self.v[:, pos:end] = v.transpose(1, 0, 2)
        self.offset = end
        return pos

    def trim(self, n: int) -> int:
        # rows past the offset are never read (attention stops at its own end), so dropping is a counter move
        n = min(max(n, 0), self.offset)
        self.offset -= n
        return n

    def reset(self) -> None:
        self.offset = 0

    @property
    def state(self) -> tuple[np.ndarray, np.ndarray]:
        """The held keys and values (views)."""
        return self.k[:, :self.offset], self.v[:, :self.offset]

    def set_state(self, k: np.ndarray, v: np.ndarray) -> None:
        n = k.shape[1]
        if k.shape[0] != self.k.shape[0] or k.shape[2] != self.k.shape[2] or v.shape[2] != self.v.shape[2] \
                or n > self.n_ctx:
            raise ValueError(f"cache state of shape {k.shape} does not fit a cache of shape {self.k.shape}")
        self.k[:, :n], self.v[:, :n], self.offset = k, v, n


def cache_offset(cache: Sequence[LayerCache]) -> int:
    """Tokens the cache holds (every layer holds the same)."""
    return cache[0].offset if cache else 0


def trim_cache(cache: Sequence[LayerCache], n: int) -> int:
    """Forget the last n tokens of every layer; returns how many were dropped."""
    return min((c.trim(n) for c in cache), default=0)
