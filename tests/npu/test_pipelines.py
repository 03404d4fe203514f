"""NPU pipelines on the emulator: error against float64, equality with the quant simulations and with an independent
float64 model of each recipe, invariance to the N-split over cores and the K-split into chunks, INT16 safety."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from npulm.linear import Weight
from npulm.npu import pipelines as P
from npulm.npu import quant as qm
from npulm.npu.chips import get_chip
from npulm.npu.emulator import EmulatorRuntime
from npulm.npu.planner import Arena
from npulm.npu.prepared import prepare
from npulm.npu.simulate import prepare as simulate_prepare
from npulm.npu.simulate import simulate

N, K, M = 192, 576, 6

# Relative Frobenius error ||y - x W^T|| / ||x W^T|| on N(0, 1) activations with one channel 20x larger, W the
# dequantized weight: the stated bound for each pipeline (measured values are about 2/3 of these).
BOUNDS = {
    "W16A16": 1e-3, "W8A8_STANDARD": 0.07, "W8A8_CHANNEL": 0.07, "W8A8_HADAMARD": 0.02, "W8A16_CHANNEL": 0.012,
    "W8A16_HADAMARD": 0.011, "W4A4_HADAMARD": 0.25, "W4A4_CHANNEL": 0.2, "W4A8_CHANNEL": 0.14, "W4A8_BLOCK": 0.14,
}


def test_every_pipeline_has_a_bound():
    assert set(BOUNDS) == set(P.PIPELINES)


@pytest.fixture(scope="module")
def arena() -> Arena:
    return Arena(EmulatorRuntime("rk3588", int16_overflow="raise"))


def make_weight(qtype: T, n: int = N, k: int = K, seed: int = 0) -> Weight:
    w = (np.random.default_rng(seed).standard_normal((n, k)) * 0.1).astype(np.float32)
    raw = w if qtype == T.F32 else gguf.quants.quantize(w, qtype)
    return Weight(f"blk.0.test.{qtype.name}", qtype, n, k, raw)


def activations(m: int = M, k: int = K, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 7] *= 20
    return x


def reference(x: np.ndarray, w: Weight) -> np.ndarray:
    return x.astype(np.float64) @ w.dequantize().astype(np.float64).T


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q4_0, T.Q8_0, T.Q5_0])
@pytest.mark.parametrize("name", list(P.PIPELINES))
def test_pipeline_error_and_simulation(arena, name, qtype):
    w, x = make_weight(qtype), activations()
    pr = prepare(name, w, arena)
    try:
        y = pr(x)
        assert y.shape == (M, N) and y.dtype == np.float32
        assert qm.relative_error(y, reference(x, w)) < BOUNDS[name]
        # the pipeline's float64 reference: equal up to float32 rounding of the NPU sums and the epilogue
        assert qm.relative_error(y, simulate(name, x, w)) < 2e-6
    finally:
        pr.close()


def test_float_pipeline_on_float_weight(arena):
    w, x = make_weight(T.F32), activations()
    pr = prepare("W16A16", w, arena)
    assert qm.relative_error(pr(x), simulate("W16A16", x, w)) < 2e-6
    pr.close()


def test_w16a16_scales_rows_out_of_fp16_range(arena):
    """Rows far beyond fp16's range (or deep in its subnormals) are scaled by a power of two, not clipped."""
    w, x = make_weight(T.F16), activations()
    x[0] *= 1e5
    x[1] *= 1e-7
    pr = prepare("W16A16", w, arena)
    y, ref = pr(x), reference(x, w)
    for r in range(M):
        assert qm.relative_error(y[r], ref[r]) < 1e-3
    pr.close()


@pytest.mark.parametrize("m", [1, M, 70])
@pytest.mark.parametrize("name", ["W8A16_CHANNEL", "W8A16_HADAMARD"])
def test_x16_pipelines_equal_their_float64_model(arena, name, m):
    """Independent float64 model of 16-bit x as two int8 rows: x ≈ q1 s1 + q2 s2 (the residual's codes), times the
    int8 per-channel weight; the C host path and the numpy path give the same float32 bits."""
    from npulm.npu import prepared as R

    w, x = make_weight(T.Q4_1), activations(m)
    if m > 1:
        x[-1] = 0  # an all-zero row: zero scales, zero output
    pr = prepare(name, w, arena)
    assert pr.real.x_residual and pr.ops[0].row_factor == 2
    x64 = x.astype(np.float64)
    if pr.rotation is not None:
        x64 = qm.rotate_activation(x64, pr.rotation)
    amax = np.abs(x64).max(axis=1, keepdims=True)
    s1 = amax / 127
    q1 = np.rint(x64 / np.where(s1 == 0, 1, s1))
    res = x64 - q1 * s1
    s2 = np.abs(res).max(axis=1, keepdims=True) / 127
    assert np.all(s2 <= s1 / 254 + 1e-300)  # the residual is at most half a step: ~15 bits in all
    q2 = np.rint(res / np.where(s2 == 0, 1, s2))
    pw = simulate_prepare(name, w)
    ref = (q1 * s1 + q2 * s2) @ qm.dequantize_codes(pw.codes, pw.scale).T
    y = pr(x)
    assert qm.relative_error(y, ref) < 2e-7 and (m == 1 or not y[-1].any())
    if R._host is not None:
        host, R._host = R._host, None
        try:
            y_np = pr(x)  # numpy path: bit-identical (the C rotation's butterfly rounds apart from numpy's products)
            assert np.array_equal(y_np, y) if pr.rotation is None else qm.relative_error(y_np, y) < 1e-9
        finally:
            R._host = host
    pr.close()


def _arena_for(chip) -> Arena:
    return Arena(EmulatorRuntime(chip, int16_overflow="raise"))


# a chip with INT4xINT4 but no INT8xINT8: every 8-bit value goes through the exact int4 halves
INT4_ONLY = dataclasses.replace(get_chip("rk3588"), name="rk3588-int4only", matmul_types=frozenset({1, 10}))
ONE_CORE = dataclasses.replace(get_chip("rk3588"), name="rk3588-1core", core_masks=frozenset(), n_cores=1)
SMALL_K = dataclasses.replace(get_chip("rk3588"), name="rk3588-k128", max_k=128)


@pytest.mark.parametrize("name", [n for n in P.PIPELINES if n != "W16A16"])
def test_n_split_and_k_split_are_exact_for_integer_pipelines(name):
    w, x = make_weight(T.Q4_1, n=320), activations()
    base = prepare(name, w, _arena_for(ONE_CORE))
    y0 = base(x)
    assert len(base.ops[0].slices) == 1
    split = prepare(name, w, _arena_for(get_chip("rk3588")))
    assert len(split.ops[0].slices) > 1
    assert np.array_equal(split(x), y0)
    chunked = prepare(name, w, _arena_for(SMALL_K))
    assert chunked.ops[0].n_chunks > split.ops[0].n_chunks
    assert np.array_equal(chunked(x), y0)


@pytest.mark.parametrize("name", ["W8A8_CHANNEL", "W8A8_HADAMARD"])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_1])
def test_int4_halves_equal_int8(name, qtype):
    """On an INT4-only chip, x halves and weight halves give exactly the INT8xINT8 results."""
    w, x = make_weight(qtype), activations(m=9)
    halves = prepare(name, w, _arena_for(INT4_ONLY))
    assert halves.real.mm_type == 10
    whole = prepare(name, w, _arena_for(dataclasses.replace(get_chip("rk3588"), name="rk3588-int8only",
                                                              matmul_types=frozenset({1, 2}))))
    assert whole.real.mm_type == 2
    assert qm.relative_error(halves(x), whole(x)) < 1e-6  # float sums over more groups: rounding only


def test_n_split_and_k_split_w16a16():
    w, x = make_weight(T.F16, n=320), activations()
    y0 = prepare("W16A16", w, _arena_for(ONE_CORE))(x)
    y1 = prepare("W16A16", w, _arena_for(get_chip("rk3588")))(x)
    assert qm.relative_error(y1, y0) < 1e-6
    pr = prepare("W16A16", w, _arena_for(SMALL_K))
    assert pr.ops[0].n_chunks == 5
    assert qm.relative_error(pr(x), y0) < 1e-6  # chunk sums added on the CPU: fp32 rounding order differs


def test_rows_beyond_the_largest_bucket_are_split(arena):
    w = make_weight(T.Q4_0)
    x = activations(m=1100, seed=3)
    pr = prepare("W8A8_CHANNEL", w, arena)
    y = pr(x)
    assert np.array_equal(y[600:610], pr(x[600:610]))  # per-row quantization: rows are independent
    assert qm.relative_error(y, simulate("W8A8_CHANNEL", x, w)) < 2e-6
    pr.close()


@pytest.mark.parametrize("name", ["W4A4_HADAMARD", "W4A4_CHANNEL", "W4A8_CHANNEL", "W4A8_BLOCK"])
def test_int4_paths_never_overflow_int16(arena, name):
    """Extreme activations (every row at its clamp) against the certified K-chunks: the emulator raises on any
    INT16 overflow (int16_overflow="raise"), so passing means every partial stayed in range."""
    w = make_weight(T.Q4_0, n=256, k=2048, seed=5)
    x = np.ones((4, 2048), np.float32)
    x[1] = -1
    x[2, ::2] = -1
    x[3] = np.sign(w.dequantize()[0])  # aligned with one weight row: the largest possible partial for that column
    pr = prepare(name, w, arena)
    assert qm.relative_error(pr(x), reference(x, w)) < BOUNDS[name] * 2
    pr.close()


def test_auto_pipeline_by_type_and_chip():
    rk3588, rk3568 = get_chip("rk3588"), get_chip("rk3568")
    assert P.auto_pipeline(T.F16, rk3588) == "W16A16"
    assert P.auto_pipeline(T.F32, rk3568) == "W16A16"
    assert P.auto_pipeline(T.BF16, rk3588) == "W16A16"
    for t in (T.Q8_0, T.Q5_0, T.Q6_K, T.Q4_0, T.Q4_1, T.Q4_K, T.IQ2_XS):
        for chip in (rk3588, rk3568):
            assert P.auto_pipeline(t, chip) == P.BEST_QUANTIZED
            P.PIPELINES[P.BEST_QUANTIZED].realize(chip)  # runs on every chip with INT8xINT8


def test_resolve():
    chip = get_chip("rk3588")
    assert P.resolve("w8a8_channel", T.Q4_0, chip) == "W8A8_CHANNEL"
    assert P.resolve("auto", T.Q8_0, chip) == P.auto_pipeline(T.Q8_0, chip)
    with pytest.raises(ValueError, match="known: W16A16"):
        P.resolve("W3A3_MAGIC", T.Q8_0, chip)


def test_realization_follows_the_chip():
    rk3588, rk3568, rk3576 = get_chip("rk3588"), get_chip("rk3568"), get_chip("rk3576")
    r = P.realize(rk3588, 8, 4)
    assert (r.mm_type, r.a_split, r.b_split) == (10, True, False)  # two INT4 passes: INT8xINT4 is not accepted
    assert P.realize(rk3588, 4, 4).mm_type == 10
    assert P.realize(rk3588, 4, 8).mm_type == 2  # weight halves would double the MACs: no INT4 gain
    assert P.realize(rk3588, 8, 8).mm_type == 2
    r = P.realize(INT4_ONLY, 4, 8)
    assert (r.mm_type, r.a_split, r.b_split) == (10, False, True)
    r = P.realize(INT4_ONLY, 8, 8)
    assert (r.mm_type, r.a_split, r.b_split) == (10, True, True)
    assert P.realize(rk3568, 4, 4).mm_type == 2  # int4 values in int8: same numbers, no INT4 on this chip
    assert P.realize(rk3576, 8, 4).mm_type == 2
    for chip in (rk3588, rk3568, rk3576):  # 16-bit x on int8 weights: two int8 rows of one INT8xINT8 call
        r = P.realize(chip, 16, 8)
        assert (r.mm_type, r.x_residual, r.rows_per_token) == (2, True, 2)
    assert P.realize(rk3588, 16, 16).mm_type == 1


def test_readme_table_is_generated_from_the_pipeline_table():
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    begin = readme.index("<!-- pipelines:")
    table = readme[readme.index("\n", begin) + 1: readme.index("<!-- /pipelines -->")].strip()
    assert table == P.table_markdown(get_chip("rk3588")), "regenerate it: python -m npulm.npu.pipelines"


# rknn_matmul_run calls per SmolLM2 token (decode, block linears) for every pipeline, counted from the planner's
# contexts: a guard against chunk explosions (the GGUF-block pipelines this table once had made 6,480-14,040).
# INT4xINT4 chunks are certified from the weights: these Gaussian ones; SmolLM2's own give W4A4_HADAMARD 750.
SMOLLM2_LINEARS = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
                   "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}
SMOLLM2_CALLS = {"W16A16": 630, "W8A8_STANDARD": 630, "W8A8_CHANNEL": 630, "W8A8_HADAMARD": 630,
                 "W8A16_CHANNEL": 630, "W8A16_HADAMARD": 630, "W4A4_HADAMARD": 570, "W4A4_CHANNEL": 660,
                 "W4A8_CHANNEL": 660, "W4A8_BLOCK": 570}


@pytest.mark.parametrize("name", list(P.PIPELINES))
def test_calls_per_token_per_pipeline(arena, name):
    assert set(SMOLLM2_CALLS) == set(P.PIPELINES)
    calls = 0
    for role, (n, k) in SMOLLM2_LINEARS.items():
        pr = prepare(name, make_weight(T.Q4_1, n, k, seed=len(role)), arena)
        op = pr.ops[0]
        runs = sum(len(cs) for cs in op.bucket(1).ctxs)
        assert runs == op.n_chunks * len(op.slices)  # one call per core per K-chunk
        if pr.spec.weight_bits > 4:  # chunks as wide as the chip allows (INT4: as wide as INT16 stays exact)
            assert op.n_chunks == -(-op.k // arena.chip.max_k)
        calls += 30 * runs
        pr.close()
    assert calls == SMOLLM2_CALLS[name]
