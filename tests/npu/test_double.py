"""The real ctypes path (RknnRuntime) against a C test double of librknnrt, cross-checked with the emulator."""

from __future__ import annotations

import numpy as np
import pytest

from npulm.npu import rknn as R
from npulm.npu.context import MatmulContext
from npulm.npu.emulator import EmulatorRuntime
from npulm.npu.librknnrt import RknnRuntime
from npulm.npu.runtime import MatmulInfo, QuantParams

NATIVE, NORM, TP = R.LAYOUT_NATIVE, R.LAYOUT_NORM, R.LAYOUT_TP_NORM
TYPES = [R.FLOAT16_MM_FLOAT16_TO_FLOAT32, R.INT8_MM_INT8_TO_INT32, R.FLOAT16_MM_FLOAT16_TO_FLOAT16,
         R.INT4_MM_INT4_TO_INT16]


@pytest.fixture(scope="module")
def rknn(double_lib):
    return RknnRuntime(double_lib, chip="rk3588")


@pytest.fixture(scope="module")
def emul():
    return EmulatorRuntime("rk3588")


def operands(mm_type: int, m: int, k: int, n: int, seed: int):
    rng = np.random.default_rng(seed)
    if mm_type in (R.FLOAT16_MM_FLOAT16_TO_FLOAT32, R.FLOAT16_MM_FLOAT16_TO_FLOAT16):
        return rng.standard_normal((m, k)).astype(np.float16), rng.standard_normal((k, n)).astype(np.float16)
    lo, hi = (-8, 8) if mm_type == R.INT4_MM_INT4_TO_INT16 else (-128, 128)
    return rng.integers(lo, hi, (m, k)).astype(np.int8), rng.integers(lo, hi, (k, n)).astype(np.int8)


def outcome(rt, mm_type, m, k, n, a, b, **kw):
    try:
        mm = MatmulContext(rt, m, k, n, mm_type, **kw)
    except R.RknnError as e:
        return type(e)
    with mm:
        mm.set_B(b)
        return mm.io, mm(a)


def assert_same(mm_type, got, want):
    if mm_type in (R.FLOAT16_MM_FLOAT16_TO_FLOAT32, R.FLOAT16_MM_FLOAT16_TO_FLOAT16):
        # the double sums in k order, the emulator through BLAS: equal up to float32 rounding (+ one fp16 ulp)
        tol = 1e-5 if mm_type == R.FLOAT16_MM_FLOAT16_TO_FLOAT32 else 2e-3
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=tol, atol=tol)
    else:
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("core", [R.CORE_0, R.CORE_1, R.CORE_2])
@pytest.mark.parametrize("ac_layout", [NORM, NATIVE])
@pytest.mark.parametrize("b_layout", [NORM, NATIVE, TP])
@pytest.mark.parametrize("mm_type", TYPES)
def test_ctypes_path_matches_emulator(rknn, emul, mm_type, b_layout, ac_layout, core):
    m, k, n = 3, 64, 128
    a, b = operands(mm_type, m, k, n, seed=mm_type * 100 + b_layout * 10 + ac_layout)
    kw = dict(B_layout=b_layout, AC_layout=ac_layout, core_mask=core)
    got, want = outcome(rknn, mm_type, m, k, n, a, b, **kw), outcome(emul, mm_type, m, k, n, a, b, **kw)
    if isinstance(want, type):  # int4 B outside the native layout: both refuse it the same way
        assert got is want is R.RknnParamInvalid
        return
    (io_r, c_r), (io_e, c_e) = got, want
    for w in "ABC":
        ar, ae = getattr(io_r, w), getattr(io_e, w)
        assert (ar.name, ar.dims, ar.size, ar.type) == (ae.name, ae.dims, ae.size, ae.type)
    assert_same(mm_type, c_r, c_e)
    if mm_type != R.FLOAT16_MM_FLOAT16_TO_FLOAT16:
        exact = a.astype(np.float64) @ b.astype(np.float64)
        assert np.allclose(c_r, exact, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mm_type", TYPES)
def test_B_native_bytes_match_emulator(rknn, emul, mm_type):
    for k, n in ((64, 128), (8192 + 64, 128)):  # the second one is split into K-segments
        _, b = operands(mm_type, 1, k, n, seed=k)
        info = MatmulInfo(1, k, n, mm_type, NATIVE, AC_layout=NATIVE)
        got, want = rknn.B_normal_to_native(b, info), emul.B_normal_to_native(b, info)
        assert got.size == want.size and np.array_equal(got, want)


def test_k_split_run(rknn, emul):
    m, k, n = 1, 8192 + 128, 32
    a, b = operands(R.INT8_MM_INT8_TO_INT32, m, k, n, seed=5)
    got = outcome(rknn, R.INT8_MM_INT8_TO_INT32, m, k, n, a, b)[1]
    assert np.array_equal(got, outcome(emul, R.INT8_MM_INT8_TO_INT32, m, k, n, a, b)[1])
    assert np.array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


INVALID = [
    MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT8),
    MatmulInfo(1, 48, 64, R.INT8_MM_INT8_TO_INT32),
    MatmulInfo(1, 64, 48, R.INT8_MM_INT8_TO_INT32),
    MatmulInfo(1, 24, 64, R.FLOAT16_MM_FLOAT16_TO_FLOAT32),
    MatmulInfo(1, 64, 64, R.INT4_MM_INT4_TO_INT16, NATIVE),
    MatmulInfo(1, 10240 + 32, 32, R.INT8_MM_INT8_TO_INT32),
    MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, iommu_domain_id=16),
    MatmulInfo(1, 64, 64, R.FLOAT16_MM_FLOAT16_TO_FLOAT32, B_quant_type=R.QUANT_PER_CHANNEL_SYM),
]


@pytest.mark.parametrize("info", INVALID)
def test_errors_through_ctypes_match_emulator(rknn, emul, info):
    with pytest.raises(R.RknnError) as e_r:
        rknn.create(info)
    with pytest.raises(R.RknnError) as e_e:
        emul.create(info)
    assert type(e_r.value) is type(e_e.value) is R.RknnParamInvalid
    assert e_r.value.function == "rknn_matmul_create"


def test_context_and_memory_calls(rknn):
    ctx, io = rknn.create(MatmulInfo(2, 64, 64, R.INT8_MM_INT8_TO_INT32, NATIVE, AC_layout=NATIVE))
    with pytest.raises(R.RknnInputInvalid):
        rknn.run(ctx)
    with pytest.raises(R.RknnParamInvalid):
        rknn.set_core_mask(ctx, 8)
    rknn.set_core_mask(ctx, R.CORE_0_1_2)
    rknn.set_quant_params(ctx, QuantParams(io.B.name, np.ones(1)))
    with pytest.raises(R.RknnParamInvalid):
        rknn.set_quant_params(ctx, QuantParams(io.B.name, np.ones(2)))
    with pytest.raises(R.RknnFail):
        rknn.get_quant_params(ctx, io.B.name)
    with pytest.raises(R.RknnMallocFail):
        rknn.create_mem(ctx, (2 << 30) + 1, R.MEMORY_CACHEABLE)
    parent = rknn.create_mem(ctx, 3 * io.B.size)
    assert parent.size == 3 * io.B.size and parent.data.size == parent.size
    view = rknn.create_mem_view(ctx, parent, io.B.size, io.B.size)
    assert view.offset == io.B.size and view.fd == parent.fd
    view.data[:4] = [1, 2, 3, 4]
    assert parent.data[io.B.size: io.B.size + 4].tolist() == [1, 2, 3, 4]
    rknn.mem_sync(ctx, view)
    rknn.destroy_mem(ctx, view)
    rknn.destroy_mem(ctx, parent)
    rknn.destroy(ctx)
    with pytest.raises(R.RknnCtxInvalid):
        rknn.run(ctx)


def test_shared_weight_slices_per_core(rknn, emul):
    m, k, n_core = 2, 128, 32
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (3 * n_core, k)).astype(np.int8)
    a = rng.integers(-128, 128, (m, k)).astype(np.int8)
    results = []
    for rt in (rknn, emul):
        owner, _ = rt.create(MatmulInfo(1, k, n_core, R.INT8_MM_INT8_TO_INT32))
        weights = rt.create_mem(owner, 3 * k * n_core)
        info = MatmulInfo(m, k, n_core, R.INT8_MM_INT8_TO_INT32, NATIVE, AC_layout=NATIVE)
        for core in range(3):
            rt.B_normal_to_native(w[core * n_core:(core + 1) * n_core].T, info,
                                  weights.data[core * k * n_core:(core + 1) * k * n_core])
        rt.mem_sync(owner, weights)
        mms = [MatmulContext(rt, m, k, n_core, R.INT8_MM_INT8_TO_INT32, core_mask=1 << c,
                             B_mem=(weights, c * k * n_core)) for c in range(3)]
        results.append(np.concatenate([mm(a) for mm in mms], axis=1))
        for mm in mms:
            mm.close()
        rt.destroy_mem(owner, weights)
        rt.destroy(owner)
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], a.astype(np.int64) @ w.T.astype(np.int64))


def test_dynamic_shapes_through_ctypes(rknn, emul):
    k, n = 64, 64
    a_all, b = operands(R.FLOAT16_MM_FLOAT16_TO_FLOAT32, 8, k, n, seed=9)
    outs = []
    for rt in (rknn, emul):
        with MatmulContext(rt, [1, 2, 8], k, n, R.FLOAT16_MM_FLOAT16_TO_FLOAT32) as mm:
            mm.set_B(b)
            outs.append([mm(a_all[:m]) for m in (2, 8, 1)])
    for got, want in zip(*outs):
        assert_same(R.FLOAT16_MM_FLOAT16_TO_FLOAT32, got, want)


@pytest.mark.parametrize("chip", ["rk3568", "rk3562", "rk3576"])
def test_other_chips(double_lib, monkeypatch, chip):
    monkeypatch.setenv("RKNN_DOUBLE_CHIP", chip)
    rknn, emul = RknnRuntime(double_lib, chip=chip), EmulatorRuntime(chip)
    for mm_type in (R.FLOAT16_MM_FLOAT16_TO_FLOAT32, R.INT8_MM_INT8_TO_INT32):
        k_al, n_al = emul.chip.align(mm_type)
        m, k, n = 3, 3 * k_al, 3 * n_al  # deliberately not tile multiples: exercises the padding
        a, b = operands(mm_type, m, k, n, seed=k)
        for b_layout in (NORM, NATIVE):
            got = outcome(rknn, mm_type, m, k, n, a, b, B_layout=b_layout, AC_layout=NATIVE)
            want = outcome(emul, mm_type, m, k, n, a, b, B_layout=b_layout, AC_layout=NATIVE)
            assert [(x.dims, x.size) for x in (got[0].A, got[0].B, got[0].C)] == \
                [(x.dims, x.size) for x in (want[0].A, want[0].B, want[0].C)]
            assert_same(mm_type, got[1], want[1])
    ctx, _ = rknn.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32))
    if emul.chip.n_cores == 1:
        with pytest.raises(R.RknnFail):
            rknn.set_core_mask(ctx, R.CORE_0)
    else:
        rknn.set_core_mask(ctx, R.CORE_1)
    rknn.destroy(ctx)
