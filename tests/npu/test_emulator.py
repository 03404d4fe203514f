"""The numpy emulator: exact integer paths, FP16 numerics, validation errors, memory rules, quantized types."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from npulm.npu import rknn as R
from npulm.npu.chips import get_chip
from npulm.npu.context import MatmulContext
from npulm.npu.emulator import EmulatorOverflowError, EmulatorRuntime
from npulm.npu.runtime import MatmulInfo, QuantParams

RNG = np.random.default_rng(11)
NATIVE, NORM, TP = R.LAYOUT_NATIVE, R.LAYOUT_NORM, R.LAYOUT_TP_NORM


def emu(chip: str = "rk3588", **kw) -> EmulatorRuntime:
    return EmulatorRuntime(chip, **kw)


def all_types_chip(name: str = "rk3588"):
    return dataclasses.replace(get_chip(name), matmul_types=frozenset(R.MATMUL_TYPES))


# --- integer exactness ---------------------------------------------------------------------------------------------


def test_int8_exact_at_extremes():
    rt = emu()
    m, k, n = 3, 8192, 64
    with MatmulContext(rt, m, k, n, R.INT8_MM_INT8_TO_INT32) as mm:
        a = np.full((m, k), -128, np.int8)
        a[1] = 127
        a[2] = RNG.integers(-128, 128, k)
        b = np.full((k, n), -128, np.int8)
        b[:, 1::2] = RNG.integers(-128, 128, (k, n // 2))
        mm.set_B(b)
        c = mm(a)
        ref = a.astype(np.int64) @ b.astype(np.int64)
        assert c.dtype == np.int32 and np.array_equal(c, ref)
        assert c[0, 0] == 128 * 128 * 8192  # 2^27: beyond float32's exact integers, still exact


@pytest.mark.parametrize("b_layout, ac_layout", [(NATIVE, NATIVE), (NATIVE, NORM)])
def test_int4_exact(b_layout, ac_layout):
    rt = emu()
    m, k, n = 7, 256, 256
    a = RNG.integers(-8, 8, (m, k)).astype(np.int8)
    b = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    with MatmulContext(rt, m, k, n, R.INT4_MM_INT4_TO_INT16, B_layout=b_layout, AC_layout=ac_layout) as mm:
        mm.set_B(b)
        c = mm(a)
    assert c.dtype == np.int16 and np.array_equal(c, a.astype(np.int64) @ b.astype(np.int64))


@pytest.mark.parametrize("policy", ["saturate", "wrap", "raise"])
def test_int16_overflow_policy(policy):
    rt = emu(int16_overflow=policy)
    k, n = 1024, 128
    a = np.array([[7] * k, [-8] * k, [1] * k], np.int8)
    b = np.full((k, n), 7, np.int8)
    exact = a.astype(np.int64) @ b.astype(np.int64)  # 50176, -57344, 7168
    with MatmulContext(rt, 3, k, n, R.INT4_MM_INT4_TO_INT16) as mm:
        mm.set_B(b)
        if policy == "raise":
            with pytest.raises(EmulatorOverflowError):
                mm(a)
            return
        c = mm(a)
    want = np.clip(exact, -32768, 32767) if policy == "saturate" else exact.astype(np.int16)
    assert np.array_equal(c, want) and c[2, 0] == 7168


# --- FP16 -----------------------------------------------------------------------------------------------------------


def test_fp16_rounds_inputs_and_accumulates_in_fp32():
    rt = emu()
    k = 4096
    with MatmulContext(rt, 1, k, 16, R.FLOAT16_MM_FLOAT16_TO_FLOAT32) as mm:
        mm.set_B(np.ones((k, 16)))
        c = mm(np.full((1, k), 0.1))
    assert c.dtype == np.float32 and np.all(c == np.float32(409.5))  # fp16(0.1) * 4096, as reported on RK3588


@pytest.mark.parametrize("accumulate", ["float32", "float64"])
def test_fp16_types_against_float64(accumulate):
    rt = emu(fp_accumulate=accumulate)
    m, k, n = 9, 512, 96
    a = RNG.standard_normal((m, k)).astype(np.float16)
    b = RNG.standard_normal((k, n)).astype(np.float16)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    bound = np.abs(a.astype(np.float64)) @ np.abs(b.astype(np.float64))
    with MatmulContext(rt, m, k, n, R.FLOAT16_MM_FLOAT16_TO_FLOAT32) as mm:
        mm.set_B(b)
        c32 = mm(a)
    assert np.all(np.abs(c32 - ref) <= bound * (k * 2.0**-24 if accumulate == "float32" else 2.0**-23))
    with MatmulContext(rt, m, k, n, R.FLOAT16_MM_FLOAT16_TO_FLOAT16, B_layout=TP, AC_layout=NORM) as mm:
        mm.set_B(b)
        c16 = mm(a)
    assert c16.dtype == np.float16
    if accumulate == "float64":  # one rounding of an (almost) exact sum: fp16(ref) up to float64 noise at ties
        assert np.mean(c16 == ref.astype(np.float16)) > 0.99
    ulp = np.spacing(np.abs(ref).astype(np.float16)).astype(np.float64)
    assert np.all(np.abs(c16.astype(np.float64) - ref) <= ulp + bound * k * 2.0**-24)


# --- validation -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("info, error", [
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT8), R.RknnParamInvalid),        # type not accepted on RK3588
    (MatmulInfo(1, 64, 64, 13), R.RknnParamInvalid),                            # no such type
    (MatmulInfo(1, 48, 64, R.INT8_MM_INT8_TO_INT32), R.RknnParamInvalid),       # K % 32
    (MatmulInfo(1, 64, 48, R.INT8_MM_INT8_TO_INT32), R.RknnParamInvalid),       # N % 32
    (MatmulInfo(1, 24, 64, R.FLOAT16_MM_FLOAT16_TO_FLOAT32), R.RknnParamInvalid),  # fp16 K % 16
    (MatmulInfo(1, 32, 128, R.INT4_MM_INT4_TO_INT16, NATIVE), R.RknnParamInvalid),  # int4 K % 64
    (MatmulInfo(1, 64, 128, R.INT4_MM_INT4_TO_INT16, NORM), R.RknnParamInvalid),   # int4 B normal
    (MatmulInfo(1, 10240 + 32, 32, R.INT8_MM_INT8_TO_INT32), R.RknnParamInvalid),  # K limit
    (MatmulInfo(0, 64, 64, R.INT8_MM_INT8_TO_INT32), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, B_layout=3), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, AC_layout=TP), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, iommu_domain_id=16), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, AC_quant_type=1), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.FLOAT16_MM_FLOAT16_TO_FLOAT32, B_quant_type=2), R.RknnParamInvalid),
    (MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, B_quant_type=4, group_size=48), R.RknnParamInvalid),
])
def test_create_errors(info, error):
    with pytest.raises(error):
        emu().create(info)


def test_k_limit_and_split_accepted():
    rt = emu()
    m, k, n = 2, 8192 + 256, 32
    a = RNG.integers(-128, 128, (m, k)).astype(np.int8)
    b = RNG.integers(-128, 128, (k, n)).astype(np.int8)
    with MatmulContext(rt, m, k, n, R.INT8_MM_INT8_TO_INT32) as mm:
        assert mm.io.B.size == n * k
        mm.set_B(b)
        assert np.array_equal(mm(a), a.astype(np.int64) @ b.astype(np.int64))
    rk3576 = emu("rk3576")
    ctx, io = rk3576.create(MatmulInfo(1, 4096 + 64, 32, R.INT8_MM_INT8_TO_INT32, NATIVE, AC_layout=NATIVE))
    rk3576.destroy(ctx)


def test_core_masks():
    rt = emu()
    ctx, _ = rt.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32))
    for mask in (R.CORE_0, R.CORE_1, R.CORE_2, R.CORE_0_1, R.CORE_0_1_2, R.CORE_AUTO, R.CORE_ALL):
        rt.set_core_mask(ctx, mask)
    with pytest.raises(R.RknnParamInvalid):
        rt.set_core_mask(ctx, 8)
    rt.destroy(ctx)
    with pytest.raises(R.RknnCtxInvalid):
        rt.set_core_mask(ctx, R.CORE_0)
    rk3576 = emu("rk3576")
    ctx, _ = rk3576.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32))
    with pytest.raises(R.RknnParamInvalid):
        rk3576.set_core_mask(ctx, R.CORE_2)
    single = emu("rk3566")
    ctx, _ = single.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32))
    with pytest.raises(R.RknnFail):
        single.set_core_mask(ctx, R.CORE_0)


def test_run_and_io_errors():
    rt = emu()
    ctx, io = rt.create(MatmulInfo(4, 64, 64, R.INT8_MM_INT8_TO_INT32, NATIVE, AC_layout=NATIVE))
    with pytest.raises(R.RknnInputInvalid):
        rt.run(ctx)
    small = rt.create_mem(ctx, io.A.size - 1)
    with pytest.raises(R.RknnParamInvalid):
        rt.set_io_mem(ctx, small, io.A)
    with pytest.raises(R.RknnParamInvalid):
        rt.set_io_mem(ctx, small, dataclasses.replace(io.A, name="D"))
    mems = {w: rt.create_mem(ctx, getattr(io, w).size) for w in "AB"}
    for w, mem in mems.items():
        rt.set_io_mem(ctx, mem, getattr(io, w))
    with pytest.raises(R.RknnOutputInvalid):
        rt.run(ctx)
    with pytest.raises(R.RknnFail):
        rt.get_quant_params(ctx, io.B.name)
    with pytest.raises(R.RknnParamInvalid):
        rt.set_quant_params(ctx, QuantParams(io.B.name, np.ones(3)))  # per layer: one scale
    for mem in (small, *mems.values()):
        rt.destroy_mem(ctx, mem)
    rt.destroy(ctx)
    with pytest.raises(R.RknnCtxInvalid):
        rt.run(ctx)


def test_memory_limits():
    chip = dataclasses.replace(get_chip("rk3588"), max_alloc_bytes=1 << 20, domain_bytes=3 << 20)
    rt = EmulatorRuntime(chip)
    ctx, _ = rt.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32))
    with pytest.raises(R.RknnMallocFail):
        rt.create_mem(ctx, (1 << 20) + 1)
    mems = [rt.create_mem(ctx, 1 << 20) for _ in range(3)]
    assert rt.domain_usage(0) == 3 << 20
    with pytest.raises(R.RknnMallocFail, match="domain 0 full"):
        rt.create_mem(ctx, 1)
    ctx1, _ = rt.create(MatmulInfo(1, 64, 64, R.INT8_MM_INT8_TO_INT32, iommu_domain_id=1))
    other = rt.create_mem(ctx1, 1 << 20)  # another domain has its own budget
    rt.destroy_mem(ctx, mems.pop())
    mems.append(rt.create_mem(ctx, 1 << 20))
    for m in mems:
        rt.destroy_mem(ctx, m)
    rt.destroy_mem(ctx1, other)
    assert rt.domain_usage(0) == rt.domain_usage(1) == 0


# --- B caching, shared buffers, cores, dynamic shapes ---------------------------------------------------------------


def test_B_rewrite_is_seen_after_sync():
    rt = emu()
    m, k, n = 2, 64, 64
    a = RNG.integers(-128, 128, (m, k)).astype(np.int8)
    with MatmulContext(rt, m, k, n, R.INT8_MM_INT8_TO_INT32) as mm:
        b1 = RNG.integers(-128, 128, (k, n)).astype(np.int8)
        mm.set_B(b1)
        assert np.array_equal(mm(a), a.astype(np.int64) @ b1)
        b2 = RNG.integers(-128, 128, (k, n)).astype(np.int8)
        mm.rt.B_normal_to_native(b2, mm.info, mm.B.data)  # raw write through the numpy view
        rt.mem_sync(mm.ctx, mm.B, R.SYNC_TO_DEVICE)
        assert np.array_equal(mm(a), a.astype(np.int64) @ b2)
        mm.set_B(b1)
        assert np.array_equal(mm(a), a.astype(np.int64) @ b1)


def test_per_core_slices_of_one_weight_buffer():
    """rk-llama.cpp's pattern: one B buffer holding each core's N-slice, one context per core, run in threads."""
    rt = emu()
    m, k, n_core = 5, 256, 64
    w = RNG.integers(-128, 128, (3 * n_core, k)).astype(np.int8)  # (N, K) like a GGUF weight
    a = RNG.integers(-128, 128, (m, k)).astype(np.int8)
    owner_ctx, _ = rt.create(MatmulInfo(1, k, n_core, R.INT8_MM_INT8_TO_INT32))
    slice_bytes = k * n_core
    weights = rt.create_mem(owner_ctx, 3 * slice_bytes)
    shared_a = rt.create_mem(owner_ctx, m * k)
    info = MatmulInfo(m, k, n_core, R.INT8_MM_INT8_TO_INT32, NATIVE, AC_layout=NATIVE)
    for core in range(3):
        rt.B_normal_to_native(w[core * n_core:(core + 1) * n_core].T, info,
                              weights.data[core * slice_bytes:(core + 1) * slice_bytes])
    rt.mem_sync(owner_ctx, weights)
    mms = [MatmulContext(rt, m, k, n_core, R.INT8_MM_INT8_TO_INT32, core_mask=1 << core,
                         B_mem=(weights, core * slice_bytes), A_mem=(shared_a, 0)) for core in range(3)]
    mms[0].write_A(a)  # the A buffer is shared
    threads = [threading.Thread(target=mm.run) for mm in mms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    c = np.concatenate([mm.read_C() for mm in mms], axis=1)
    assert np.array_equal(c, a.astype(np.int64) @ w.T.astype(np.int64))
    for mm in mms:
        mm.close()
    rt.destroy_mem(owner_ctx, weights)
    rt.destroy_mem(owner_ctx, shared_a)
    rt.destroy(owner_ctx)
    assert rt.domain_usage(0) == 0


def test_dynamic_m():
    rt = emu()
    k, n = 128, 64
    b = RNG.standard_normal((k, n)).astype(np.float16)
    with MatmulContext(rt, [1, 4, 16], k, n, R.FLOAT16_MM_FLOAT16_TO_FLOAT32) as mm:
        mm.set_B(b)
        for m in (4, 1, 16, 1):
            a = RNG.standard_normal((m, k)).astype(np.float16)
            c = mm(a)
            assert c.shape == (m, n)
            assert np.allclose(c, a.astype(np.float64) @ b.astype(np.float64), rtol=1e-5, atol=1e-4)
        with pytest.raises(ValueError):
            mm.select_m(3)
    with pytest.raises(R.RknnParamInvalid):
        rt.create_dynamic_shape(MatmulInfo(1, k, n, 1), [(1, k, n), (2, 2 * k, n)])


# --- quantized types (not accepted on RK3588: enabled on a custom chip) ----------------------------------------------


def quant_case(rt, mm_type, m, k, n, a, b, *, b_quant=R.QUANT_PER_LAYER_SYM, group=0, sa=1.0, sb=(1.0,), sc=1.0,
               zpa=None, zpb=None, zpc=None):
    with MatmulContext(rt, m, k, n, mm_type, B_quant_type=b_quant, group_size=group) as mm:
        mm.set_B(b)
        mm.set_quant_params("A", sa, zpa)
        mm.set_quant_params("B", np.asarray(sb, np.float32), zpb)
        mm.set_quant_params("C", sc, zpc)
        return mm(a)


def test_int8_to_int8_requantizes():
    rt = EmulatorRuntime(all_types_chip(), int8_rounding="half_even")
    m, k, n = 4, 64, 32
    a = RNG.integers(-128, 128, (m, k)).astype(np.int8)
    b = RNG.integers(-128, 128, (k, n)).astype(np.int8)
    c = quant_case(rt, R.INT8_MM_INT8_TO_INT8, m, k, n, a, b, sa=0.02, sb=(0.01,), sc=0.5, zpa=3, zpc=-5)
    acc = (a.astype(np.int64) - 3) @ b.astype(np.int64)
    want = np.clip(np.rint(acc * (np.float64(np.float32(0.02)) * np.float32(0.01) / np.float32(0.5))) - 5, -128, 127)
    assert c.dtype == np.int8 and np.array_equal(c, want)
    assert len(np.unique(c)) > 20  # a real spread of values, not all saturated


def test_hybrid_per_channel_and_per_group():
    rt = EmulatorRuntime(all_types_chip())
    m, k, n = 3, 128, 128
    a = RNG.standard_normal((m, k)).astype(np.float16)
    b8 = RNG.integers(-128, 128, (k, n)).astype(np.int8)
    s_n = RNG.uniform(0.001, 0.01, n).astype(np.float32)
    c = quant_case(rt, R.FLOAT16_MM_INT8_TO_FLOAT32, m, k, n, a, b8, b_quant=R.QUANT_PER_CHANNEL_SYM, sb=s_n)
    ref = a.astype(np.float64) @ (b8 * s_n.astype(np.float64))
    assert np.allclose(c, ref, rtol=1e-4, atol=1e-4)
    g = 32
    b4 = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    s_g = RNG.uniform(0.01, 0.1, (n, k // g)).astype(np.float32)  # [N][K/G]
    c = quant_case(rt, R.FLOAT16_MM_INT4_TO_FLOAT16, m, k, n, a, b4, b_quant=R.QUANT_PER_GROUP_SYM, group=g,
                   sb=s_g.reshape(-1))
    ref = a.astype(np.float64) @ (b4 * np.repeat(s_g.T, g, axis=0))
    assert c.dtype == np.float16 and np.allclose(c, ref, rtol=2e-3, atol=2e-3)
    rt_kn = EmulatorRuntime(all_types_chip(), group_scale_order="KN")
    c_kn = quant_case(rt_kn, R.FLOAT16_MM_INT4_TO_FLOAT16, m, k, n, a, b4, b_quant=R.QUANT_PER_GROUP_SYM, group=g,
                      sb=s_g.T.reshape(-1))
    assert np.array_equal(c_kn, c)


def test_other_integer_a_types():
    rt = EmulatorRuntime(all_types_chip())
    m, k, n = 2, 128, 128
    a = RNG.integers(-128, 128, (m, k)).astype(np.int8)
    b4 = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    exact = a.astype(np.int64) @ b4.astype(np.int64)
    with MatmulContext(rt, m, k, n, R.INT8_MM_INT4_TO_INT32) as mm:
        mm.set_B(b4)
        assert np.array_equal(mm(a), exact)
    c = quant_case(rt, R.INT8_MM_INT4_TO_FLOAT16, m, k, n, a, b4, sa=0.5, sb=(0.25,))
    assert c.dtype == np.float16 and np.array_equal(c, (exact * 0.125).astype(np.float16))
    b8 = RNG.integers(-128, 128, (k, n)).astype(np.int8)
    c = quant_case(rt, R.INT8_MM_INT8_TO_FLOAT32, m, k, n, a, b8, sa=0.5, sb=(0.25,), sc=2.0)
    assert c.dtype == np.float32 and np.array_equal(c, (a.astype(np.int64) @ b8 * 0.0625).astype(np.float32))


def test_bfloat16_output():
    rt = EmulatorRuntime(all_types_chip())
    m, k, n = 2, 64, 128
    a = RNG.standard_normal((m, k)).astype(np.float16)
    b4 = RNG.integers(-8, 8, (k, n)).astype(np.int8)
    with MatmulContext(rt, m, k, n, R.FLOAT16_MM_INT4_TO_BFLOAT16) as mm:
        mm.set_B(b4)
        c = mm(a)
        raw = mm.c_view()
    assert raw.dtype == np.uint16 and c.dtype == np.float32
    ref = a.astype(np.float64) @ b4
    assert np.allclose(c, ref, rtol=2**-8, atol=1e-6)
    assert np.all((c.view(np.uint32) & 0xFFFF) == 0)  # a bf16 value widened
