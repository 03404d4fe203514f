"""Samplers against llama.cpp's own test vectors (tests/test-sampling.cpp) and the chain's invariants."""

from __future__ import annotations

import numpy as np
import pytest

from npulm.sampling import (
    Mirostat,
    SamplingParams,
    apply_repeat_penalty,
    dry_penalties,
    make_sampler,
    min_p,
    penalize,
    softmax,
    token_counts,
    top_k,
    top_p,
    typical,
)


def _cands(logits):
    lg = np.asarray(logits, dtype=np.float64)
    return np.arange(len(lg)), lg


def _probs(c):
    """Kept (id -> probability renormalized over the kept set), as llama.cpp's tests compare after `dist`."""
    ids, lg = c
    return dict(zip(ids.tolist(), softmax(lg).tolist()))


def _check(c, expected: list[float]):
    got = sorted(_probs(c).values(), reverse=True)
    np.testing.assert_allclose(got, sorted(expected, reverse=True), atol=1e-5)


P4 = np.log([0.1, 0.2, 0.3, 0.4])


def test_top_k_llama_cpp_vectors():
    _check(top_k(_cands(P4), 1), [1.0])
    _check(top_k(_cands(P4), 3), [0.44444, 0.33333, 0.22222])
    _check(top_k(_cands(P4), 4), [0.4, 0.3, 0.2, 0.1])
    _check(top_k(_cands(P4), 0), [0.4, 0.3, 0.2, 0.1])  # 0 disables


def test_top_p_llama_cpp_vectors():
    _check(top_p(_cands(P4), 0.0), [1.0])
    _check(top_p(_cands(P4), 0.7), [0.571429, 0.428571])
    _check(top_p(_cands(P4), 0.8), [0.44444, 0.33333, 0.22222])
    _check(top_p(_cands(P4), 1.0), [0.4, 0.3, 0.2, 0.1])


def test_top_p_on_a_large_vocabulary_matches_a_full_sort():
    rng = np.random.default_rng(0)
    lg = rng.standard_normal(5000) * 4
    for p in (0.5, 0.9, 0.999):
        ids, _ = top_p(_cands(lg), p)
        order = np.argsort(-lg)
        cum = np.cumsum(softmax(lg)[order])
        assert sorted(ids.tolist()) == sorted(order[:np.searchsorted(cum, p) + 1].tolist())


def test_min_p_llama_cpp_vectors():
    for p, want in [(0.0, [0.1, 0.2, 0.3, 0.4]), (0.24, [0.1, 0.2, 0.3, 0.4]), (0.26, [0.2 / .9, 0.3 / .9, 0.4 / .9]),
                    (0.49, [0.2 / .9, 0.3 / .9, 0.4 / .9]), (0.51, [0.3 / .7, 0.4 / .7]), (0.74, [0.3 / .7, 0.4 / .7]),
                    (0.76, [1.0]), (1.0, [1.0])]:
        _check(min_p(_cands(P4), p), want)


def test_typical_llama_cpp_vectors():
    ids, _ = typical(_cands(np.log([0.97, 0.01, 0.01, 0.01])), 0.5)
    assert ids.tolist() == [0]
    ids, _ = typical(_cands(np.log([0.4, 0.2, 0.2, 0.2])), 0.5)
    assert sorted(ids.tolist()) == [1, 2, 3]


@pytest.mark.parametrize("history, want, repeat, freq, pres", [
    ([0], [0, 0.25, 0.25, 0.25, 0.25], 50.0, 0.0, 0.0),
    ([0, 1, 2], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
    ([0, 1, 2, 0, 0], [0, 0, 0, 0.5, 0.5], 50.0, 0.0, 0.0),
    ([0], [0.000011, 0.249997, 0.249997, 0.249997, 0.249997], 1.0, 5.0, 5.0),
    ([0, 1, 2], [0.000023, 0.000023, 0.000023, 0.499966, 0.499966], 1.0, 5.0, 5.0),
    ([0, 1, 2, 0, 0], [0.000000, 0.000023, 0.000023, 0.499977, 0.499977], 1.0, 5.0, 5.0),
])
def test_penalties_llama_cpp_vectors(history, want, repeat, freq, pres):
    lg = np.log(np.full(5, 0.2))
    ids, counts = token_counts(history, len(history))
    lg[ids] = penalize(lg[ids], counts, repeat, freq, pres)
    np.testing.assert_allclose(softmax(lg), want, atol=1e-5)


@pytest.mark.parametrize("probs, history, want, mult, base, allowed, last_n, breakers", [
    ([0.25] * 4, [0, 1], [0.25] * 4, 1.0, 1.1, 2, 4, {}),
    ([0.25] * 4, [0, 1, 2, 0, 1], [0.296923, 0.296923, 0.109232, 0.296923], 1.0, 1.1, 2, 5, {}),
    ([0.2] * 5, [0, 1, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 2, 6, {3: [()]}),
    ([0.2] * 5, [0, 1, 2, 0, 1], [0.241818, 0.241818, 0.032727, 0.241818, 0.241818], 2.0, 1.1, 2, 5, {}),
    ([0.2] * 5, [0, 1, 2, 3, 4, 0, 1], [0.2] * 5, 1.0, 1.1, 4, 7, {}),
])
def test_dry_llama_cpp_vectors(probs, history, want, mult, base, allowed, last_n, breakers):
    lg = np.log(probs)
    for tok, pen in dry_penalties(history, mult, base, allowed, last_n, breakers).items():
        lg[tok] -= pen
    np.testing.assert_allclose(softmax(lg), want, atol=1e-5)


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


def _reference_chain(logits, history, sp: SamplingParams):
    """The chain on a full float64 copy of the vocabulary: what the pooled hot path must reproduce."""
    lg = logits.astype(np.float64)
    for t, b in (sp.logit_bias or {}).items():
        lg[t] += b
    ids, counts = token_counts(history, sp.repeat_last_n)
    lg[ids] = penalize(lg[ids], counts, sp.repeat_penalty, sp.frequency_penalty, sp.presence_penalty)
    c = top_k(_cands(lg), sp.top_k)
    c = top_p(c, sp.top_p)
    return min_p(c, sp.min_p)


def test_pooled_hot_path_keeps_the_same_candidates_as_a_full_copy():
    """The sampler never copies the vocabulary when top-k cuts it; its candidate set must equal the full chain's.
    With temperature -> 0+ the draw is the argmax of that set, so compare the greedy pick and the set's support."""
    rng = np.random.default_rng(1)
    n = 50_000
    for trial in range(20):
        lg = (rng.standard_normal(n) * rng.uniform(0.5, 6)).astype(np.float32)
        top = np.argsort(-lg)[:30]
        history = list(rng.choice(top, 40)) + list(rng.integers(0, n, 40))
        sp = SamplingParams(temperature=1.0, top_k=int(rng.integers(1, 60)), top_p=0.9, min_p=0.02,
                            repeat_penalty=1.3, frequency_penalty=0.4, presence_penalty=-0.2,
                            logit_bias={int(top[0]): -100.0, int(rng.integers(0, n)): 12.0})
        ids, _ = _reference_chain(lg, history, sp)
        want = set(ids.tolist())
        s = make_sampler(sp)
        got = {s(lg, history) for _ in range(300)}
        assert got <= want, trial
        greedy = make_sampler(SamplingParams(**{**sp.__dict__, "temperature": 0.0}))
        ref_lg = lg.astype(np.float64)
        ref_lg[list(sp.logit_bias)] += list(sp.logit_bias.values())
        i, cnt = token_counts(history, 64)
        ref_lg[i] = penalize(ref_lg[i], cnt, 1.3, 0.4, -0.2)
        assert greedy(lg, history) == int(np.argmax(ref_lg))


def test_logit_bias_minus_100_bans_and_plus_forces():
    lg = np.zeros(1000, np.float32)
    lg[7] = 5.0
    assert make_sampler(0.0, logit_bias={7: -100})(lg, []) != 7
    assert make_sampler(0.0, logit_bias={"42": 100})(lg, []) == 42  # OpenAI clients send ids as strings
    s = make_sampler(1.0, top_k=0, top_p=1.0, min_p=0.0, logit_bias={7: -100}, seed=0)
    assert 7 not in {s(lg, []) for _ in range(200)}


def test_constraint_masks_and_accepts():
    class OnlyEven:
        def __init__(self):
            self.seen = []

        def allowed(self, n):
            m = np.zeros(n, bool)
            m[::2] = True
            return m

        def accept(self, t):
            self.seen.append(t)

    lg = np.arange(100, dtype=np.float32)
    c = OnlyEven()
    assert make_sampler(0.0, constraint=c)(lg, []) == 98
    s = make_sampler(1.0, top_k=0, top_p=1.0, min_p=0.0, constraint=c, seed=1)
    assert all(s(lg, []) % 2 == 0 for _ in range(100)) and len(c.seen) == 101


def test_mirostat_targets_the_surprise_tau():
    rng = np.random.default_rng(0)
    lg = rng.standard_normal(2000) * 3
    probs = softmax(lg)
    for version in (1, 2):
        means = []
        for tau in (0.5, 3.0, 8.0):
            m = Mirostat(version, tau=tau, eta=0.1)
            means.append(np.mean([-np.log2(probs[m((np.arange(2000), lg), 2000, rng)]) for _ in range(600)][200:]))
        assert means[0] < means[1] < means[2], (version, means)
        assert means[0] < -np.log2(probs.max()) + 0.5  # nearly greedy
    s = make_sampler(0.8, mirostat_mode=1, seed=0)
    assert 0 <= s(lg.astype(np.float32), []) < 2000


@pytest.mark.parametrize("kw, name", [
    (dict(top_k=-1), "top_k"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(temperature=float("nan")), "temperature"), (dict(repeat_penalty=0.0), "repeat_penalty"),
    (dict(min_p=2.0), "min_p"), (dict(typical_p=-1.0), "typical_p"), (dict(mirostat_mode=3), "mirostat_mode"),
    (dict(logit_bias={"x": 1}), "logit_bias"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty"), (dict(dry_multiplier=-1.0), "dry_multiplier"),
])
def test_bad_parameters_rejected_up_front_by_name(kw, name):
    with pytest.raises(ValueError, match=name):
        make_sampler(**kw)
