"""Weight planning on the emulator: N-split over cores, K-chunks, INT16 certificates, IOMMU domains and allocation
limits, contexts per M bucket, shared A/C scratch, freeing, and the runtime's own errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from npulm.npu import planner as PL
from npulm.npu.chips import GiB, get_chip
from npulm.npu.emulator import EmulatorOverflowError, EmulatorRuntime
from npulm.npu.rknn import RknnMallocFail, RknnParamInvalid

RK3588 = get_chip("rk3588")
INT8, INT4, FP16 = 2, 10, 1
RNG = np.random.default_rng(7)


def ints(shape, lo: int, hi: int) -> np.ndarray:
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


def test_split_n_whole_tiles():
    assert PL.split_n(576, 3, 32) == [(0, 192), (192, 384), (384, 576)]
    assert PL.split_n(192, 3, 128) == [(0, 128), (128, 256)]  # 2 tiles of 128: only 2 cores get work
    assert PL.split_n(640, 3, 128) == [(0, 256), (256, 512), (512, 640)]
    assert PL.split_n(100, 1, 32) == [(0, 128)]
    for n in (1, 33, 1000, 49152):
        parts = PL.split_n(n, 3, 64)
        assert parts[0][0] == 0 and parts[-1][1] >= n and all(b % 64 == 0 and b > a for a, b in parts)
        assert all(parts[i][1] == parts[i + 1][0] for i in range(len(parts) - 1))


def test_equal_chunks():
    assert PL.equal_chunks(576, 8192, 32) == (576, 1)
    assert PL.equal_chunks(1536, 448, 64) == (384, 4)
    assert PL.equal_chunks(20480, 8192, 32) == (6848, 3)
    w, n = PL.equal_chunks(1000, 300, 64)
    assert w % 64 == 0 and w <= 300 and w * n >= 1000


def test_int16_certificate():
    worst = np.full((4, 2048), 8, np.int64)
    assert PL.int16_safe_chunk(worst, 8, 64, 8192) == 448  # 511 // 64 * 64: the worst case
    typical = np.abs(ints((64, 2048), -8, 7)).astype(np.int64)  # mean |code| ~4: about twice the worst case
    w = PL.int16_safe_chunk(typical, 8, 64, 8192)
    assert w >= 640
    nch = -(-2048 // w)
    padded = np.zeros((64, nch * w), np.int64)
    padded[:, :2048] = typical
    assert 8 * padded.reshape(64, nch, w).sum(axis=2).max() <= 32767


@pytest.fixture()
def rt() -> EmulatorRuntime:
    return EmulatorRuntime("rk3588", int16_overflow="raise")


def test_matmul_equals_integer_product(rt):
    arena = PL.Arena(rt)
    b = ints((200, 300), -128, 127)
    op = PL.NpuMatmul(arena, b, INT8, chunk_k=128)
    assert op.n_chunks == 3 and len(op.slices) == 3
    a = ints((5, 3 * 128), -128, 127)
    a[:, 300:] = 0
    c = op.run(a.reshape(5, 3, 128).transpose(1, 0, 2))
    ref = np.stack([a[:, j * 128:(j + 1) * 128].astype(np.int64) @ np.pad(b, ((0, 0), (0, 84)))[
        :, j * 128:(j + 1) * 128].T.astype(np.int64) for j in range(3)])
    assert np.array_equal(c, ref)
    assert op.buckets.keys() == {1, 8}  # bucket 1 at load, 8 for 5 rows (padded up)


def test_int4_matmul_and_nibbles(rt):
    arena = PL.Arena(rt)
    b = ints((256, 128), -8, 7)
    op = PL.NpuMatmul(arena, b, INT4, chunk_k=128)
    a = ints((3, 128), -8, 7)
    c = op.run(a[None])
    assert c.dtype == np.int16
    assert np.array_equal(c[0], a.astype(np.int64) @ b.T.astype(np.int64))


def test_fp16_matmul(rt):
    arena = PL.Arena(rt)
    b = RNG.standard_normal((48, 64)).astype(np.float16)
    op = PL.NpuMatmul(arena, b, FP16, chunk_k=64)
    a = RNG.standard_normal((7, 64)).astype(np.float16)
    c = op.run(a[None])
    ref = a.astype(np.float64) @ b.T.astype(np.float64)
    assert np.abs(c[0] - ref).max() < 1e-4 * np.abs(ref).max()


def test_a_is_written_once_and_shared_by_the_cores(rt):
    arena = PL.Arena(rt)
    op = PL.NpuMatmul(arena, ints((96, 64), -128, 127), INT8, chunk_k=64)
    bk = op.bucket(1)
    a = ints((1, 64), -128, 127)
    op.run(a[None])
    fds = {v.fd for ctx, v in bk.views if v.size == 64}  # each core's A view: 64 bytes of one shared buffer
    assert len(fds) == 1 and len(bk.ctxs) == 3


def test_stale_rows_are_zeroed(rt):
    """Rows between the call's M and its bucket are zeroed: a previous larger call leaves nothing behind."""
    arena = PL.Arena(rt)
    b = ints((32, 64), -8, 7)
    op = PL.NpuMatmul(arena, b, INT4, chunk_k=64)
    op.run(np.full((1, 4, 64), -8, np.int8))
    op.run(np.ones((1, 3, 64), np.int8))
    assert not op.bucket(4).a_arr[:, :, 3:, :].any()


def test_overflow_without_certificate_is_caught_by_the_emulator(rt):
    """The hazard the certificate prevents: 1024 products of -8 x -8 exceed INT16."""
    arena = PL.Arena(rt)
    op = PL.NpuMatmul(arena, np.full((128, 1024), -8, np.int8), INT4, chunk_k=1024)
    with pytest.raises(EmulatorOverflowError):
        op.run(np.full((1, 1, 1024), -8, np.int8))


def test_k_beyond_the_runtime_limit_is_the_runtimes_error(rt):
    """A chip table allowing K chunks above the API's K limit: rknn_matmul_create refuses, as on hardware."""
    chip = dataclasses.replace(RK3588, name="rk3588-bigk", max_k=16384)
    arena = PL.Arena(EmulatorRuntime(chip))
    with pytest.raises(RknnParamInvalid, match="K=12288"):
        PL.NpuMatmul(arena, ints((32, 12288), -1, 1), INT8, chunk_k=12288)
    with pytest.raises(ValueError, match="multiple of 32"):
        PL.NpuMatmul(arena, ints((32, 100), -1, 1), INT8, chunk_k=100)


def test_unsupported_type_is_refused_as_by_the_runtime():
    arena = PL.Arena(EmulatorRuntime("rk3568"))
    with pytest.raises(RknnParamInvalid):
        PL.NpuMatmul(arena, ints((32, 64), -8, 7), INT4, chunk_k=64)


def test_allocations_respect_the_per_allocation_limit():
    chip = dataclasses.replace(RK3588, name="rk3588-small-alloc", max_alloc_bytes=40_000)
    rt = EmulatorRuntime(chip)
    arena = PL.Arena(rt)
    b = ints((384, 512), -128, 127)  # 196 KB of int8 segments
    op = PL.NpuMatmul(arena, b, INT8, chunk_k=128)
    assert len(op.allocs) >= 5 and all(m.size <= 40_000 for m in op.allocs)
    a = ints((2, 512), -128, 127)
    c = op.run(a.reshape(2, 4, 128).transpose(1, 0, 2)).sum(axis=0)
    assert np.array_equal(c, a.astype(np.int64) @ b.T.astype(np.int64))


def test_weights_spread_over_iommu_domains_and_are_freed():
    chip = dataclasses.replace(RK3588, name="rk3588-small-domains", domain_bytes=1 << 20, max_alloc_bytes=1 << 20)
    rt = EmulatorRuntime(chip)
    arena = PL.Arena(rt, scratch_share=4)  # 256 KB of each domain kept for A/C scratch
    ops = [PL.NpuMatmul(arena, ints((512, 512), -128, 127), INT8, chunk_k=512) for _ in range(5)]
    assert [op.domain for op in ops] == [0, 0, 0, 1, 1]  # 3 x 256 KB fit in 1 MB - 256 KB
    assert all(rt.domain_usage(d) <= chip.domain_bytes for d in range(chip.n_domains))
    x = ints((1, 512), -128, 127)
    for op in ops:
        assert op.run(x[None]).shape == (1, 1, 512)
    used = [rt.domain_usage(d) for d in (0, 1)]
    for op in ops:
        op.close()
    del op, ops
    assert [rt.domain_usage(d) for d in (0, 1)] < used
    assert rt.domain_usage(1) == 0 and arena.used[1] == 0  # the domain-1 scratch went with its last user
    arena.close()
    assert rt.domain_usage(0) == 0


def test_no_domain_has_room():
    chip = dataclasses.replace(RK3588, name="rk3588-tiny", domain_bytes=1 << 16, n_domains=1)
    arena = PL.Arena(EmulatorRuntime(chip))
    with pytest.raises(MemoryError):
        PL.NpuMatmul(arena, ints((512, 512), -128, 127), INT8, chunk_k=512)


def test_scratch_is_shared_between_weights(rt):
    arena = PL.Arena(rt)
    a_op = PL.NpuMatmul(arena, ints((64, 64), -128, 127), INT8, chunk_k=64)
    b_op = PL.NpuMatmul(arena, ints((64, 64), -128, 127), INT8, chunk_k=64)
    assert a_op.bucket(1).c is b_op.bucket(1).c
    before = rt.domain_usage(0)
    PL.NpuMatmul(arena, ints((64, 64), -128, 127), INT8, chunk_k=64)
    assert rt.domain_usage(0) - before < 2 * 64 * 64  # only the new B


def test_contexts_per_bucket_and_destroyed_on_close(rt):
    arena = PL.Arena(rt)
    op = PL.NpuMatmul(arena, ints((96, 256), -128, 127), INT8, chunk_k=128)
    assert op.n_contexts == 2 * 3
    for m in (1, 3, 4, 200):
        op.run(np.zeros((2, m, 128), np.int8))
    assert sorted(op.buckets) == [1, 4, 256] and op.n_contexts == 3 * 6  # 3 rows share bucket 4
    live, used = len(rt._ctxs), rt.domain_usage(0)
    op.close()
    assert len(rt._ctxs) == live - 18
    assert rt.domain_usage(0) <= used - 96 * 256


def test_core_pool_runs_groups_in_parallel_threads_and_reraises():
    pool = PL.CorePool(2)
    seen = []

    def fn(g):
        import threading

        seen.append((g, threading.current_thread().name))
        if g == "boom":
            raise RknnMallocFail(-4, "rknn_matmul_run")

    pool.run(fn, ["a", "b", "c"])
    assert {g for g, _ in seen} == {"a", "b", "c"} and len({t for _, t in seen}) == 3
    with pytest.raises(RknnMallocFail):
        pool.run(fn, ["a", "boom"])
    pool.close()


def test_parallel_arena_gives_the_same_result(rt):
    b = ints((300, 256), -128, 127)
    a = ints((1, 9, 256), -128, 127)
    serial = PL.NpuMatmul(PL.Arena(rt, parallel=False), b, INT8, chunk_k=256).run(a).copy()
    par_arena = PL.Arena(rt, parallel=True)
    assert par_arena.pool is not None
    assert np.array_equal(PL.NpuMatmul(par_arena, b, INT8, chunk_k=256).run(a), serial)
    par_arena.close()


def test_gib_budget_constants():
    assert RK3588.max_alloc_bytes == 2 * GiB and RK3588.domain_bytes == 4 * GiB
