"""The compiled fused ops (in npulm.cpu._kernels) compute what the numpy path of each block piece computes."""

from __future__ import annotations

import numpy as np
import pytest

from npulm.models import blocks

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


@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("m", [1, 3])
def test_attention(monkeypatch, window, m):
    shape = blocks.AttentionShape(n_head=6, n_head_kv=2, head_dim_k=16, head_dim_v=24, scale=0.25, window=window)
    pos = 11
    q = rng.standard_normal((m, 6, 16)).astype(np.float32)
    k = rng.standard_normal((m, 2, 16)).astype(np.float32)
    v = rng.standard_normal((m, 2, 24)).astype(np.float32)

    cached_k, cached_v = rng.standard_normal((2, pos, 16)), rng.standard_normal((2, pos, 24))

    def run():
        cache = blocks.KVCache(2, 32, 16, 24)
        cache.k[:, :pos], cache.v[:, :pos] = cached_k, cached_v
        return blocks.attention(q, k, v, cache, pos, shape)

    fused, plain = both(monkeypatch, run)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [0, 700])
@pytest.mark.parametrize("m", [1, 3])
def test_attention_long_context_slices(monkeypatch, window, m):
    """Past ATTN_MIN_SLICE keys per thread the C path splits the keys into slices and merges their softmaxes."""
    from npulm import cpu

    shape = blocks.AttentionShape(n_head=4, n_head_kv=2, head_dim_k=32, head_dim_v=40, scale=0.2, window=window)
    pos = 1100
    q = rng.standard_normal((m, 4, 32)).astype(np.float32)
    k = rng.standard_normal((m, 2, 32)).astype(np.float32)
    v = rng.standard_normal((m, 2, 40)).astype(np.float32)
    cached_k = rng.standard_normal((2, pos, 32)) * 2
    cached_v = rng.standard_normal((2, pos, 40))

    def run():
        cache = blocks.KVCache(2, 1200, 32, 40)
        cache.k[:, :pos], cache.v[:, :pos] = cached_k, cached_v
        return blocks.attention(q, k, v, cache, pos, shape)

    before = cpu.get_num_threads()
    try:
        for threads in (1, 3):  # one slice, then three
            cpu.set_num_threads(threads)
            fused, plain = both(monkeypatch, run)
            np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-5)
    finally:
        cpu.set_num_threads(before)


def test_attention_reads_float16_edge_values(monkeypatch):
    """Head sizes off the 8-lane conversion (so the scalar float16 decoder runs too) and cached values that are
    subnormal, zero, negative zero or near float16's largest: the C path decodes them as numpy does."""
    shape = blocks.AttentionShape(n_head=2, n_head_kv=1, head_dim_k=12, head_dim_v=13, scale=0.5)
    special = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, 1e-3, 1.0, -2.5], np.float16)
    q = rng.standard_normal((1, 2, 12)).astype(np.float32) * 1e-4  # scores stay finite next to 65504
    k = rng.standard_normal((1, 1, 12)).astype(np.float32)
    v = rng.standard_normal((1, 1, 13)).astype(np.float32)

    cached_k, cached_v = rng.choice(special, (10, 12)), rng.choice(special, (10, 13))

    def run():
        cache = blocks.KVCache(1, 16, 12, 13)
        cache.k[0, :10], cache.v[0, :10] = cached_k, cached_v
        return blocks.attention(q, k, v, cache, 10, shape)

    fused, plain = both(monkeypatch, run)
    np.testing.assert_allclose(fused, plain, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("act", [blocks.silu, blocks.gelu])
def test_gated_mlp(monkeypatch, act):
    x = rng.standard_normal((2, 8)).astype(np.float32)
    wg, wu, wd = (rng.standard_normal(s).astype(np.float32) for s in ((16, 8), (16, 8), (8, 16)))
    fused, plain = both(monkeypatch, lambda: blocks.gated_mlp(x, lambda a: a @ wg.T, lambda a: a @ wu.T,
                                                              lambda a: a @ wd.T, act))
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)
