"""Native layouts, int4 nibbles and the chip table."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npulm.npu import layout as L
from npulm.npu.chips import CHIPS, UnknownChipError, detect_chip, get_chip
from npulm.npu.rknn import LAYOUT_NATIVE, LAYOUT_NORM, LAYOUT_TP_NORM

RNG = np.random.default_rng(7)


# --- int4 ----------------------------------------------------------------------------------------------------------


def test_int4_nibble_orders():
    v = np.array([1, -2, 7, -8], np.int8)
    assert L.pack_int4(v, "low").tolist() == [0xE1, 0x87]
    assert L.pack_int4(v, "high").tolist() == [0x1E, 0x78]
    for order in ("low", "high"):
        assert L.unpack_int4(L.pack_int4(v, order), order).tolist() == v.tolist()


@pytest.mark.parametrize("order", ["low", "high"])
def test_int4_round_trip_all_values(order):
    v = RNG.integers(-8, 8, (5, 64)).astype(np.int8)
    v[0, :16] = np.arange(-8, 8)
    packed = L.pack_int4(v, order)
    assert packed.shape == (5, 32) and packed.dtype == np.uint8
    assert np.array_equal(L.unpack_int4(packed, order), v)
    assert np.array_equal(L.from_bytes(L.to_bytes(v, "int4", order), "int4", v.size, order), v.reshape(-1))


def test_nibble_order_validation():
    with pytest.raises(ValueError):
        L.NibbleOrder(b_native="middle")
    n = L.NibbleOrder()
    assert n.for_tensor("B", LAYOUT_NATIVE) == "high" and n.for_tensor("A", LAYOUT_NATIVE) == "low"
    assert n.for_tensor("B", LAYOUT_NORM) == "low"


# --- tiles ---------------------------------------------------------------------------------------------------------


def test_a_native_index_formula():
    m, k, sk = 3, 20, 8  # K padded 20 -> 24
    a = np.arange(m * k, dtype=np.int32).reshape(m, k) + 1
    nat = L.rows_to_native(a, sk)
    assert nat.shape == (3, m, sk)
    for k1 in range(3):
        for mm in range(m):
            for k2 in range(sk):
                kk = k1 * sk + k2
                assert nat[k1, mm, k2] == (a[mm, kk] if kk < k else 0)
    assert np.array_equal(L.rows_from_native(nat, k), a)


def test_c_native_index_formula():
    m, n, sn = 2, 12, 8  # N padded 12 -> 16
    c = RNG.standard_normal((m, n)).astype(np.float32)
    nat = L.rows_to_native(c, sn)
    assert nat.shape == (2, m, sn)
    for n1 in range(2):
        for mm in range(m):
            for n2 in range(sn):
                nn = n1 * sn + n2
                assert nat[n1, mm, n2] == (c[mm, nn] if nn < n else 0)
    assert np.array_equal(L.rows_from_native(nat, n), c)


def test_b_native_index_formula():
    k, n, sn, sk = 40, 24, 16, 32  # K padded to 64, N to 32
    b = np.arange(k * n, dtype=np.int32).reshape(k, n) + 1
    flat = L.b_to_native(b, sn, sk)
    assert flat.size == L.b_native_count(k, n, sn, sk) == 64 * 32
    nat = flat.reshape(2, 2, sn, sk)
    for n1, k1, n2, k2 in np.ndindex(nat.shape):
        kk, nn = k1 * sk + k2, n1 * sn + n2
        assert nat[n1, k1, n2, k2] == (b[kk, nn] if kk < k and nn < n else 0)
    assert np.array_equal(L.b_from_native(flat, k, n, sn, sk), b)


def test_b_native_k_segments():
    k, n, sn, sk, split = 96 + 40, 32, 16, 32, 64  # segments of K 64, 64, 8 (padded to 32)
    assert L.k_segments(k, split) == [(0, 64), (64, 128), (128, 136)]
    b = RNG.integers(-100, 100, (k, n)).astype(np.int16)
    flat = L.b_to_native(b, sn, sk, split)
    assert flat.size == L.b_native_count(k, n, sn, sk, split) == n * (64 + 64 + 32)
    # each segment is its own native block of the K-rows it covers
    seg2 = flat[n * 64: n * 128]
    assert np.array_equal(seg2, L.b_to_native(b[64:128], sn, sk))
    assert np.array_equal(L.b_from_native(flat, k, n, sn, sk, split), b)
    assert L.k_segments(64, 64) == [(0, 64)] and L.k_segments(64, None) == [(0, 64)]


@pytest.mark.parametrize("chip_name", sorted(CHIPS))
def test_round_trips_for_every_chip_and_type(chip_name):
    chip = get_chip(chip_name)
    for t in sorted(chip.matmul_types):
        a_dt, b_dt, c_dt = chip.dtypes(t)
        k_al, n_al = chip.align(t)
        a_sk, b_sn, b_sk, c_sn = chip.tiles(t)
        m, k, n = 3, 3 * k_al, 2 * n_al
        lo, hi = (-8, 8) if b_dt == "int4" else (-128, 128)
        a = RNG.integers(lo, hi, (m, k)).astype(L.NP_DTYPES[a_dt])
        b = RNG.integers(lo, hi, (k, n)).astype(L.NP_DTYPES[b_dt])
        assert np.array_equal(L.rows_from_native(L.rows_to_native(a, a_sk), k), a)
        assert np.array_equal(L.b_from_native(L.b_to_native(b, b_sn, b_sk, chip.b_split_k), k, n, b_sn, b_sk,
                                              chip.b_split_k), b)
        c = RNG.standard_normal((m, n)).astype(np.float32)
        assert np.array_equal(L.rows_from_native(L.rows_to_native(c, c_sn), n), c)


def test_io_shapes_match_the_header():
    rk3588, rk3568 = get_chip("rk3588"), get_chip("rk3568")
    a, b, c = L.io_shapes(rk3588, 1, 4, 64, 32, LAYOUT_NATIVE, LAYOUT_NATIVE)
    assert (a.dims, b.dims, c.dims) == ((8, 4, 8), (2, 2, 16, 32), (8, 4, 4))
    assert (a.size, b.size, c.size) == (4 * 64 * 2, 64 * 32 * 2, 4 * 32 * 4)
    a, b, c = L.io_shapes(rk3588, 10, 2, 64, 128, LAYOUT_NATIVE, LAYOUT_NATIVE)
    assert (a.dims, b.dims, c.dims) == ((2, 2, 32), (2, 2, 64, 32), (16, 2, 8))  # int16 C tile is 8 on RK3588
    assert (a.size, b.size, c.size) == (64, 64 * 128 // 2, 2 * 128 * 2)
    a, b, c = L.io_shapes(rk3588, 2, 2, 64, 32, LAYOUT_TP_NORM, LAYOUT_NORM)
    assert (a.dims, b.dims, c.dims) == ((2, 64), (32, 64), (2, 32)) and c.dtype == "int32"
    _, b, _ = L.io_shapes(rk3568, 1, 1, 32, 16, LAYOUT_NATIVE, LAYOUT_NATIVE)
    assert b.dims == (2, 2, 8, 16)
    # K above the RK3588 split: B segments, padded per segment
    _, b, _ = L.io_shapes(rk3588, 2, 1, 8192 + 32, 32, LAYOUT_NATIVE, LAYOUT_NATIVE)
    assert b.size == 32 * (8192 + 32)


# --- chips ---------------------------------------------------------------------------------------------------------


def test_chip_table():
    rk3588 = get_chip("RK3588")
    assert rk3588.n_cores == 3 and rk3588.max_k == 8192 and rk3588.matmul_types == {1, 2, 4, 10}
    assert get_chip("rk3588s") is rk3588 and get_chip("rk3566") is get_chip("rk3568")
    assert get_chip("rk3576").n_cores == 2 and get_chip("rk3576").max_k == 4096
    for name in ("rk3562", "rk3568"):
        chip = get_chip(name)
        assert chip.n_cores == 1 and not chip.core_masks
        assert {chip.dtypes(t)[0] for t in chip.matmul_types} <= {"fp16", "int8"}
    assert rk3588.align(1) == (16, 8) and rk3588.align(2) == (32, 32) and rk3588.align(10) == (64, 128)
    assert rk3588.padded_align(1) == (32, 16)
    assert rk3588.max_alloc_bytes == 2 << 30 and rk3588.domain_bytes == 4 << 30
    custom = dataclasses.replace(rk3588, matmul_types=frozenset({1, 3}))
    assert custom.supports(3) and custom.align(3) == (32, 32)


def test_unknown_chip_lists_known():
    with pytest.raises(UnknownChipError) as e:
        get_chip("rk9999")
    assert all(name in str(e.value) for name in ("rk3588", "rk3576", "rk3568", "rk3566", "rk3562"))


def test_detect_chip(tmp_path):
    p = tmp_path / "compatible"
    p.write_bytes(b"radxa,rock-5b\0rockchip,rk3588\0")
    assert detect_chip(str(p)).name == "rk3588"
    p.write_bytes(b"firefly,roc-rk3566-pc\0rockchip,rk3566\0")
    assert detect_chip(str(p)).name == "rk3568"
    p.write_bytes(b"raspberrypi,5-model-b\0brcm,bcm2712\0")
    assert detect_chip(str(p)) is None
    assert detect_chip(str(tmp_path / "missing")) is None
