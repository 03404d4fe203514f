"""Caches apart from weights: one model, several sequences, batched passes, rollback."""

from __future__ import annotations

import numpy as np
import pytest

from npulm.gguf import GGUFFile
from npulm.models import load_model
from npulm.models.cache import cache_offset, trim_cache
from npulm.placement import Placement

A = [1, 270, 291, 273, 273, 276, 290, 261, 284, 276]
B = [1, 279, 273, 265, 290, 296]


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_batch_of_sequences_equals_each_alone(tiny_models, name):
    """Sequences at different positions, with prefill and decode rows mixed, in one pass."""
    model = load_model(GGUFFile(tiny_models[name]), 32, Placement(default="cpu-ref"))
    alone = []
    for toks in (A, B):
        cache = model.make_cache()
        first = model.forward(toks[:-2], cache, logits_from=0)
        alone.append(np.concatenate([first, model.forward(toks[-2:], cache, logits_from=0)]))
    ca, cb = model.make_cache(), model.make_cache()
    model.forward(A[:-2], ca)
    # A decodes its next 2 tokens while B prefills all but its last 2, then both finish in one more pass
    la, lb = model.forward_batch([A[-2:], B[:-2]], [ca, cb], logits_from=0)
    np.testing.assert_allclose(la, alone[0][-2:], rtol=0, atol=1e-4 * np.abs(la).max())
    np.testing.assert_allclose(lb, alone[1][:-2], rtol=0, atol=1e-4 * np.abs(lb).max())
    last = model.forward_batch([[5], B[-2:]], [ca, cb])  # default: the last row of each
    assert [x.shape for x in last] == [(1, model.n_vocab), (1, model.n_vocab)]
    np.testing.assert_allclose(last[1], alone[1][-1:], rtol=0, atol=1e-4 * np.abs(last[1]).max())
    assert cache_offset(ca) == len(A) + 1 and cache_offset(cb) == len(B)


def test_trim_rolls_back_exactly(tiny_models):
    model = load_model(GGUFFile(tiny_models["llama"]), 32)
    cache = model.make_cache()
    model.forward(A, cache)
    ref = model.forward([250], cache)
    assert trim_cache(cache, 4) == 4 and cache_offset(cache) == len(A) - 3
    model.forward(A[-3:], cache)  # the same tokens again: the same state
    np.testing.assert_array_equal(model.forward([250], cache), ref)
    assert trim_cache(cache, 100) == len(A) + 1 and cache_offset(cache) == 0


def test_two_models_keep_their_own_state(tiny_models):
    """Weights are shared, state is not: two caches of one model never see each other's tokens."""
    model = load_model(GGUFFile(tiny_models["llama"]), 32)
    c1, c2 = model.make_cache(), model.make_cache()
    x1 = model.forward(A, c1)
    model.forward(B, c2)
    np.testing.assert_array_equal(model.forward(A, model.make_cache()), x1)
    assert cache_offset(c1) == len(A) and cache_offset(c2) == len(B)
