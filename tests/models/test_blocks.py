"""The compiled fused ops (in npulm.cpu._kernels) compute what the numpy path of each block piece computes."""

from __future__ import annotations

import numpy as np
import pytest

from npulm import cpu
from npulm.models import blocks
from npulm.models.cache import KVCache

pytestmark = pytest.mark.skipif(blocks._ops is None, reason="npulm.cpu._kernels not built")
rng = np.random.default_rng(0)


def both(monkeypatch, fn):
    fused = fn()
    with monkeypatch.context() as m:
        m.setattr(blocks, "_ops", None)
        plain = fn()
    return fused, plain


def test_rms_norm(monkeypatch):
    x, w = rng.standard_normal((5, 3, 64)).astype(np.float32), rng.standard_normal(64).astype(np.float32)
    fused, plain = both(monkeypatch, lambda: blocks.rms_norm(x, w, 1e-6))
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(monkeypatch, neox):
    rope = blocks.Rope(n_rot=32, base=10000.0, n_ctx=64, neox=neox)  # n_rot < head_dim: the tail passes through
    x = rng.standard_normal((4, 3, 48)).astype(np.float32)
    fused, plain = both(monkeypatch, lambda: rope(x.copy(), 9))
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fused[..., 32:], x[..., 32:])


def attention_both(monkeypatch, shape: blocks.AttentionShape, m: int, cached_k: np.ndarray, cached_v: np.ndarray,
                   n_ctx: int, q_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The C and the numpy attention of m random new tokens after a cache holding cached_k / cached_v."""
    q = rng.standard_normal((m, shape.n_head, shape.head_dim_k)).astype(np.float32) * np.float32(q_scale)
    k = rng.standard_normal((m, shape.n_head_kv, shape.head_dim_k)).astype(np.float32)
    v = rng.standard_normal((m, shape.n_head_kv, shape.head_dim_v)).astype(np.float32)

    def run():
        cache = KVCache(shape.n_head_kv, n_ctx, shape.head_dim_k, shape.head_dim_v)
        cache.set_state(cached_k, cached_v)
        return blocks.attention(q, k, v, cache, shape)

    return both(monkeypatch, run)


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("m", [1, 3])
def test_attention(monkeypatch, window, m):
    shape = blocks.AttentionShape(n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=24, scale=0.25, window=window)
    cached = rng.standard_normal((2, 11, 16)), rng.standard_normal((2, 11, 24))
    fused, plain = attention_both(monkeypatch, shape, m, *cached, n_ctx=32)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 700])
@pytest.mark.parametrize("m", [1, 3])
def test_attention_long_context_slices(monkeypatch, window, m):
    """Past ATTN_MIN_SLICE keys per thread the C path splits the keys into slices and merges their softmaxes."""
    shape = blocks.AttentionShape(n_head=4, n_head_kv=2, head_dim_k=32, head_dim_v=40, scale=0.2, window=window)
    cached = rng.standard_normal((2, 1100, 32)) * 2, rng.standard_normal((2, 1100, 40))
    before = cpu.get_num_threads()
    try:
        for threads in (1, 3):  # one slice, then three
            cpu.set_num_threads(threads)
            fused, plain = attention_both(monkeypatch, shape, m, *cached, n_ctx=1200)
            np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)
    finally:
        cpu.set_num_threads(before)


def assert_rows_alone_as_batched(shape: blocks.AttentionShape, n_cached: int, m: int) -> None:
    """m new rows after n_cached random cached tokens: each row's output in one call of all m is bit for bit its
    output alone (after the rows before it)."""
    nkv, d = shape.n_head_kv, shape.head_dim_k
    cached = rng.standard_normal((nkv, n_cached, d)), rng.standard_normal((nkv, n_cached, d))
    q = rng.standard_normal((m, shape.n_head, d)).astype(np.float32)
    k = rng.standard_normal((m, nkv, d)).astype(np.float32)
    v = rng.standard_normal((m, nkv, d)).astype(np.float32)

    def cache_after(n: int) -> KVCache:
        cache = KVCache(nkv, n_cached + m, d, d)
        cache.set_state(*cached)
        if n:
            blocks.attention(q[:n], k[:n], v[:n], cache, shape)
        return cache

    batched = blocks.attention(q, k, v, cache_after(0), shape)
    for i in range(m):
        alone = blocks.attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], cache_after(i), shape)
        np.testing.assert_array_equal(alone[0], batched[i])


@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("n_head_kv", [1, 3])
def test_attention_row_is_the_same_alone_or_batched(window, n_head_kv):
    """Rows sharing a cache (a verify pass, a batched step) are chunked to share key conversions; each row's output
    is still bit for bit what that row gets alone, so batching and speculation cannot flip a greedy token."""
    shape = blocks.AttentionShape(n_head=3 * n_head_kv, n_head_kv=n_head_kv, head_dim_k=64, head_dim_v=64,
                                  scale=0.125, window=window)
    assert_rows_alone_as_batched(shape, 40, 7)


@pytest.mark.parametrize("threads", [2, 3])
def test_attention_row_is_the_same_alone_or_batched_across_slice_counts(threads):
    """At long contexts the keys are split into slices per thread; a row's slices are its own (not the batch's), so a
    verify pass whose rows straddle a change in the slice count (2 x 256 keys here) still gives each row its bits
    alone, and rows in one task share their key blocks where their slices line up."""
    before = cpu.get_num_threads()
    cpu.set_num_threads(threads)
    try:
        shape = blocks.AttentionShape(n_head=6, n_head_kv=2, head_dim_k=64, head_dim_v=64, scale=0.125)
        assert_rows_alone_as_batched(shape, 500, 16)
    finally:
        cpu.set_num_threads(before)


@pytest.mark.parametrize("window,neox,head_dim", [(0, False, 64), (6, True, 32)])
def test_batched_sequences_in_one_call_match_one_call_each(window, neox, head_dim):
    """A batched decode step's attention (RoPE, cache append and attention of every sequence in one C call) gives
    the bits that one call per sequence gives, outputs and caches alike."""
    if getattr(blocks._ops, "attention_seqs", None) is None:
        pytest.skip("this build has no attention_seqs")
    shape = blocks.AttentionShape(n_head=6, n_head_kv=2, head_dim_k=head_dim, head_dim_v=head_dim, scale=0.2,
                                  window=window)
    rope = blocks.Rope(n_rot=head_dim // 2, base=10000.0, n_ctx=64, neox=neox)
    counts, held = [1, 2, 1, 3, 11], [5, 0, 17, 9, 4]  # the last: a prompt chunk riding in the step
    m = sum(counts)
    q = rng.standard_normal((m, 6, head_dim)).astype(np.float32)
    k = rng.standard_normal((m, 2, head_dim)).astype(np.float32)
    v = rng.standard_normal((m, 2, head_dim)).astype(np.float32)

    def caches() -> list[KVCache]:
        out = []
        for n in held:
            cache = KVCache(2, 64, head_dim, head_dim)
            cache.set_state(rng.standard_normal((2, n, head_dim)), rng.standard_normal((2, n, head_dim)))
            out.append(cache)
        return out

    state = rng.bit_generator.state
    fused_caches = caches()
    rng.bit_generator.state = state
    alone_caches = caches()
    spans = [(sum(counts[:i]), sum(counts[:i + 1])) for i in range(len(counts))]
    fused = blocks.attend(q.copy(), k.copy(), v.copy(), fused_caches, spans, rope, shape)
    for (a, b), cache in zip(spans, alone_caches):
        alone = blocks.attend(q[a:b].copy(), k[a:b].copy(), v[a:b].copy(), [cache], [(0, b - a)], rope, shape)
        np.testing.assert_array_equal(alone, fused[a:b])
    for f, a in zip(fused_caches, alone_caches):
        assert f.offset == a.offset
        np.testing.assert_array_equal(f.k, a.k)
        np.testing.assert_array_equal(f.v, a.v)


def test_attention_reads_float16_edge_values(monkeypatch):
    """Head sizes off the 8-lane conversion (so the scalar float16 decoder runs too) and cached values that are
    subnormal, zero, negative zero or near float16's largest: the C path decodes them as numpy does."""
    shape = blocks.AttentionShape(n_head=2, n_head_kv=1, head_dim_k=12, head_dim_v=13, scale=0.5)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, 1e-3, 1.0, -2.5], np.float16)
    cached = rng.choice(special, (1, 10, 12)), rng.choice(special, (1, 10, 13))
    # small queries: scores stay finite next to 65504
    fused, plain = attention_both(monkeypatch, shape, 1, *cached, n_ctx=16, q_scale=1e-4)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("m", [2, 1100])  # 1100 x 16 values: more than one task of the C op
@pytest.mark.parametrize("act", [blocks.silu, blocks.gelu])
def test_gated_mlp(monkeypatch, act, m):
    x = (rng.standard_normal((m, 8)) * 3).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (16, 8), (8, 16)))
    fused, plain = both(monkeypatch, lambda: blocks.gated_mlp(x, lambda a: a @ wg.T, lambda a: a @ wu.T,
                                                              lambda a: a @ wd.T, act))
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5 * np.abs(plain).max())
