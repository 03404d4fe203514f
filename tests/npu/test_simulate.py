"""The pipelines' float64 references (npulm.npu.simulate): direct formulas, error bounds, literal integer sums."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T
from test_quant import outlier_activations  # tests/npu is on sys.path (pytest's rootdir-less import mode)

from npulm.linear import Weight
from npulm.npu import quant as qm
from npulm.npu.pipelines import PIPELINES
from npulm.npu.simulate import prepare, simulate


def _q41_weight(n: int, k: int, seed: int = 0) -> Weight:
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.05).astype(np.float32)
    return Weight("w", T.Q4_1, n, k, quants.quantize(w, T.Q4_1))


def test_w8a8_standard_matches_direct_formula():
    wt = _q41_weight(40, 576)
    w = wt.dequantize().astype(np.float64)
    x = outlier_activations(5, 576)
    sw = np.abs(w).max() / 127
    wq = np.clip(np.rint(w / sw), -127, 127)
    sx = np.abs(x).max(axis=1, keepdims=True) / 127
    xq = np.clip(np.rint(x / sx), -127, 127)
    ref = (xq @ wq.T) * sx * sw
    y = simulate("W8A8_STANDARD", x, wt)
    assert np.abs(y - ref).max() < 1e-12 * np.abs(ref).max()


def test_w4a4_hadamard_recipe_pads_and_rotates():
    wt = _q41_weight(32, 576)
    pw = prepare("W4A4_HADAMARD", wt, seed=2)
    assert pw.rotation.k_pad == 1024 and pw.codes.shape == (32, 1024) and pw.scale.shape == (1, 1)
    assert np.abs(pw.codes).max() <= 7
    pc = prepare("W8A8_HADAMARD", wt)
    assert pc.rotation.block == 64 and pc.codes.shape == (32, 576) and pc.scale.shape == (32, 1)


# bounds on relative Frobenius error for outlier activations (M=16, K=576) and a random Q4_1 weight
_BOUNDS = {"W16A16": 1e-3, "W8A8_STANDARD": 0.05, "W8A8_CHANNEL": 0.05, "W8A8_HADAMARD": 0.02,
           "W8A16_CHANNEL": 0.012, "W8A16_HADAMARD": 0.01, "W4A4_HADAMARD": 0.5, "W4A4_CHANNEL": 0.4,
           "W4A8_CHANNEL": 0.2, "W4A8_BLOCK": 0.2}


def test_every_pipeline_simulates_within_bounds():
    assert set(_BOUNDS) == set(PIPELINES)
    wt = _q41_weight(64, 576, seed=3)
    x = outlier_activations(16, 576, seed=4)
    ref = x @ wt.dequantize().astype(np.float64).T
    err = {}
    for name, p in PIPELINES.items():
        y = simulate(p, x, wt)
        assert y.shape == (16, 64) and y.dtype == np.float64
        err[name] = qm.relative_error(y, ref)
        assert err[name] < _BOUNDS[name], (name, err[name])
        literal = simulate(p, x, wt, literal=True)  # per-group integer sums, INT4 split where RK3588 needs it
        assert np.abs(literal - y).max() < 1e-12 * np.abs(ref).max(), name
    # the orderings the baselines report: rotation and per-channel scales help, 16-bit x beats int8 x
    assert err["W8A8_HADAMARD"] < err["W8A8_CHANNEL"] <= err["W8A8_STANDARD"] * 1.01
    assert err["W8A16_HADAMARD"] < err["W8A8_HADAMARD"] and err["W8A16_CHANNEL"] < err["W8A8_CHANNEL"]
    assert err["W4A4_CHANNEL"] < err["W4A4_HADAMARD"]


def test_recipes_reject_bad_inputs():
    with pytest.raises(ValueError, match="unknown NPU pipeline"):
        prepare("W3A3", np.ones((4, 32)))
    with pytest.raises(ValueError, match="x must be"):
        simulate("W8A8_CHANNEL", np.ones((2, 31)), np.ones((4, 32)))
