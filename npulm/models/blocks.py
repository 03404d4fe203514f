"""Pieces shared by the architectures: RMSNorm, RoPE, grouped-query attention over a KV cache, gated MLP.

Activations are float32 arrays of shape (M, dim) for M tokens. Every weight matmul is a `Linear` from placement.
Each piece is written in numpy; where the compiled `npulm.cpu._kernels` exists, the same math runs there in one call
(a decode step otherwise spends as long in ~60 small numpy calls per layer as in its matmuls).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..linear import Linear
from .cache import KVCache

try:
    from ..cpu import _kernels as _ops  # the fused ops live in the kernels extension (one thread pool)
except ImportError:  # not built: numpy only
    _ops = None

# up to this many new tokens, attention runs in the fused loop (each row computed as it is alone, so a prompt gives
# the same bits whether a prefix of it was cached or not); beyond, batched BLAS wins (benchmarks/attention_rows.py)
DECODE_ROWS = 16


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / rms(x) * weight over the last axis (GGUF norm weights already hold Gemma's +1)."""
    if _ops is not None and x.flags.c_contiguous and x.dtype == np.float32:
        out = np.empty_like(x)
        _ops.rms_norm(x, weight, out, x.size // x.shape[-1], x.shape[-1], eps)
        return out
    ms = np.einsum("...i,...i->...", x, x, dtype=np.float32)[..., None] / np.float32(x.shape[-1])
    return x * (1.0 / np.sqrt(ms + np.float32(eps))) * weight


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


_GELU_C = np.float32(math.sqrt(2.0 / math.pi))


def gelu(x: np.ndarray) -> np.ndarray:
    """tanh approximation, as ggml_gelu."""
    return 0.5 * x * (1.0 + np.tanh(_GELU_C * (x + np.float32(0.044715) * x * x * x)))


class Rope:
    """Rotary position embedding with tables for every position, computed once.

    neox=False: llama.cpp's ROPE_TYPE_NORM, adjacent pairs (x[2i], x[2i+1]) rotate (GGUF llama q/k are stored so).
    neox=True:  pairs (x[i], x[i + n_rot/2]) (qwen2, gemma). Dimensions past n_rot pass through.
    """

    def __init__(self, n_rot: int, base: float, n_ctx: int, scale: float = 1.0, neox: bool = False):
        self.n_rot, self.neox = n_rot, neox
        inv_freq = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
        angles = np.outer(np.arange(n_ctx, dtype=np.float64) * scale, inv_freq)  # (n_ctx, n_rot/2)
        self.cos = np.cos(angles).astype(np.float32)
        self.sin = np.sin(angles).astype(np.float32)

    def __call__(self, x: np.ndarray, pos: int) -> np.ndarray:
        """x: (M, n_heads, head_dim) for positions pos..pos+M-1; rotated in place and returned."""
        m = x.shape[0]
        if _ops is not None and x.flags.c_contiguous and x.dtype == np.float32:
            _ops.rope(x, self.cos, self.sin, m, x.shape[1], x.shape[2], self.n_rot, pos, self.neox)
            return x
        cos = self.cos[pos:pos + m, None, :]
        sin = self.sin[pos:pos + m, None, :]
        half = self.n_rot // 2
        if self.neox:
            a, b = x[..., :half], x[..., half:self.n_rot]
        else:
            a, b = x[..., 0:self.n_rot:2], x[..., 1:self.n_rot:2]
        a2 = a * cos - b * sin
        b[...] = a * sin + b * cos
        a[...] = a2
        return x


@dataclass
class AttentionShape:
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    scale: float  # multiplies q·k
    window: int = 0  # sliding window (0 = global): a key is visible while q_pos - k_pos < window


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: KVCache, s: AttentionShape) -> np.ndarray:
    """Causal grouped-query attention of M new tokens, appended to the cache after the tokens it holds.

    q: (M, n_head, dk), k: (M, n_kv, dk), v: (M, n_kv, dv) -> (M, n_head * dv).
    """
    pos = cache.append(k, v)
    m = q.shape[0]
    end = pos + m
    if (_ops is not None and m <= DECODE_ROWS and q.flags.c_contiguous and q.dtype == np.float32
            and cache.k.dtype == np.float16):
        out = np.empty((m, s.n_head * s.head_dim_v), np.float32)
        _ops.attention(q, cache.k, cache.v, out, m, s.n_head, s.n_head_kv, s.head_dim_k, s.head_dim_v, cache.n_ctx,
                       pos, s.scale, s.window)
        return out
    # prefill: the visible cache converted to float32 once; query chunks read the keys up to their own end only
    # (causal), which skips most of the masked half of the scores
    start = max(0, pos - s.window + 1) if s.window else 0
    keys, values = cache.k[:, start:end].astype(np.float32), cache.v[:, start:end].astype(np.float32)
    return np.concatenate([_attend(q[c:c + ATTN_CHUNK], keys, values, start, pos + c, s)
                           for c in range(0, m, ATTN_CHUNK)])


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, caches: Sequence[KVCache], spans: Sequence[tuple[int, int]],
           rope: Rope, s: AttentionShape) -> np.ndarray:
    """RoPE at each sequence's own positions, then attention over its own cache, for every sequence of a batch:
    rows spans[j] of q / k / v belong to the sequence whose layer cache is caches[j]."""
    if len(spans) == 1:
        pos = caches[0].offset
        return attention(rope(q, pos), rope(k, pos), v, caches[0], s)
    out = np.empty((q.shape[0], s.n_head * s.head_dim_v), np.float32)
    # the leading sequences of decode size (a batched step's; a prompt chunk rides last) go through one C call:
    # Python's per-sequence calls would cost as much as their math
    n_short = 0
    while n_short < len(spans) and spans[n_short][1] - spans[n_short][0] <= DECODE_ROWS:
        n_short += 1
    seqs = getattr(_ops, "attention_seqs", None)  # None: not built, or a build without float16 conversion
    if (seqs is not None and n_short > 1 and q.dtype == k.dtype == v.dtype == np.float32
            and q.flags.c_contiguous and k.flags.c_contiguous and v.flags.c_contiguous
            and all(c.k.dtype == np.float16 for c in caches[:n_short])):
        short, e = caches[:n_short], spans[n_short - 1][1]
        counts = [b - a for a, b in spans[:n_short]]
        positions = [c.offset for c in short]  # the call checks them against the caches before writing any
        seqs(q[:e], k[:e], v[:e], out[:e], [c.k for c in short], [c.v for c in short], positions, counts, rope.cos,
             rope.sin, rope.n_rot, rope.neox, s.n_head, s.n_head_kv, s.head_dim_k, s.head_dim_v, s.scale, s.window)
        for c, n in zip(short, counts):
            c.offset += n
        spans, caches = spans[n_short:], caches[n_short:]
    for (a, b), cache in zip(spans, caches):
        pos = cache.offset
        out[a:b] = attention(rope(q[a:b], pos), rope(k[a:b], pos), v[a:b], cache, s)
    return out


ATTN_CHUNK = 128  # measured on SmolLM2 / Gemma-3 prefill: 128 beats 256 (less masked work) and 64 (more calls)


@functools.lru_cache(maxsize=8)
def _future_mask(m: int) -> np.ndarray:
    """(m, m) additive mask: 0 on and below the diagonal, -inf above (a query's own chunk holds its future)."""
    return np.triu(np.full((m, m), -np.inf, np.float32), 1)


def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, k0: int, pos: int, s: AttentionShape
            ) -> np.ndarray:
    """Queries at positions pos..pos+M-1 over keys / values (n_kv, T, d) that hold positions k0.. (batched BLAS)."""
    m = q.shape[0]
    end = pos + m
    lo = max(k0, pos - s.window + 1) if s.window else k0  # the first key any query of this chunk sees
    keys, values = keys[:, lo - k0:end - k0], values[:, lo - k0:end - k0]
    t = end - lo
    group = s.n_head // s.n_head_kv
    # query head h uses kv head h // group (as llama.cpp): (n_kv, group*M, dk)
    qg = q.transpose(1, 0, 2).reshape(s.n_head_kv, group * m, s.head_dim_k)
    scores = np.matmul(qg, keys.transpose(0, 2, 1))  # (n_kv, group*M, T)
    scores *= np.float32(s.scale)
    by_query = scores.reshape(s.n_head_kv, group, m, t)
    by_query[..., t - m:] += _future_mask(m)  # only the chunk's own keys can lie in a query's future
    if s.window and end - 1 - lo >= s.window:  # some keys fell out of a later query's window
        too_old = np.arange(pos, end)[:, None] - np.arange(lo, end)[None, :] >= s.window
        by_query[:, :, too_old] = -np.inf
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    out = np.matmul(scores, values)  # (n_kv, group*M, dv), normalized after: dv values a row instead of T
    out /= scores.sum(axis=-1, keepdims=True)
    return out.reshape(s.n_head, m, s.head_dim_v).transpose(1, 0, 2).reshape(m, s.n_head * s.head_dim_v)


def gated_mlp(x: np.ndarray, gate: Linear, up: Linear, down: Linear, act=silu) -> np.ndarray:
    """down(act(gate(x)) * up(x)): SwiGLU for llama/qwen2, GeGLU for gemma."""
    g, u = gate(x), up(x)
    fusable = g.dtype == u.dtype == np.float32 and g.flags.c_contiguous and g.flags.writeable and u.flags.c_contiguous
    if not fusable or act not in _FUSED_ACT:
        return down(act(g) * u)
    if _ops is not None:
        _ops.gated(g, u, g.size, _FUSED_ACT[act])  # g <- act(g) * u in place (g is ours until down() reads it)
    else:
        _gated_inplace(g, u, act)
    return down(g)


def _gated_inplace(g: np.ndarray, u: np.ndarray, act) -> None:
    """Without the C ops: g <- act(g) * u with one temporary: both activations as g / (1 + exp(t)) (GELU's
    0.5 (1 + tanh z) is sigmoid(2z)). A prefill batch's (M, n_ff) arrays are MBs each, and every fresh one costs page
    faults: the plain expression (seven temporaries) measured ~3x slower inside the model."""
    if act is gelu:
        t = np.multiply(g, g)
        t *= np.float32(-2 * _GELU_C * 0.044715)
        t -= np.float32(2 * _GELU_C)
        t *= g  # -2z
    else:
        t = np.negative(g)
    with np.errstate(over="ignore"):  # exp -> inf gives g / inf = 0, the right limit
        np.exp(t, out=t)
    t += np.float32(1)
    np.divide(g, t, out=g)
    g *= u


_FUSED_ACT = {silu: 0, gelu: 1}
