from __future__ import annotations

import numpy as np

from npulm.sampling import apply_repeat_penalty, make_sampler, min_p, top_k, top_p


def _cands(logits):
    lg = np.asarray(logits, dtype=np.float64)
    return np.arange(len(lg)), lg


def test_top_k_keeps_the_k_largest():
    ids, _ = top_k(_cands([0.1, 3.0, 2.0, -1.0, 2.5]), 2)
    assert sorted(ids.tolist()) == [1, 4]
    assert len(top_k(_cands([1, 2, 3]), 0)[0]) == 3  # 0 disables


def test_top_p_smallest_set_reaching_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    ids, _ = top_p(_cands(np.log(probs)), 0.75)
    assert ids.tolist() == [0, 1]
    ids, _ = top_p(_cands(np.log(probs)), 0.79)
    assert ids.tolist() == [0, 1]
    ids, _ = top_p(_cands(np.log(probs)), 0.81)
    assert ids.tolist() == [0, 1, 2]


def test_min_p_relative_to_best():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    ids, _ = min_p(_cands(np.log(probs)), 0.2)  # keep p >= 0.1
    assert sorted(ids.tolist()) == [0, 1, 2]


def test_repeat_penalty_as_llama_cpp():
    out = apply_repeat_penalty(np.array([2.0, -2.0, 1.0]), [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


def test_greedy_and_seeded_sampling():
    logits = np.log(np.array([0.1, 0.6, 0.3])).astype(np.float32)
    assert make_sampler(temperature=0)(logits, []) == 1
    draws = [make_sampler(1.0, 0, 1.0, 0.0, seed=7)(logits, []) for _ in range(5)]
    assert len(set(draws)) == 1  # same seed, same draw
    s = make_sampler(1.0, 0, 1.0, 0.0, seed=3)
    counts = np.bincount([s(logits, []) for _ in range(3000)], minlength=3) / 3000
    np.testing.assert_allclose(counts, [0.1, 0.6, 0.3], atol=0.04)
    s = make_sampler(1.0, 1, 1.0, 0.0, seed=3)  # top-k 1 is greedy whatever the temperature
    assert {s(logits, []) for _ in range(50)} == {1}
