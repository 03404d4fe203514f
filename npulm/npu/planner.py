"""Placing one weight on the NPU and running it: K-chunks x per-core N-slices, contexts per M bucket, shared A/C
scratch, IOMMU budgets, and a small persistent thread pool that runs the cores in parallel.

At load (`NpuMatmul(arena, b, mm_type, chunk_k)`):
  * B (N, K) logical values (fp16, or int8 holding int8/int4 values) is zero-padded to the chip's alignment, cut into
    `n_chunks` K-chunks of equal width `chunk_k` (<= chip.max_k; the pipeline picks it, e.g. short enough that an
    INT4xINT4 partial cannot overflow INT16) and, along N, into one slice per NPU core (whole alignment tiles, as even
    as possible). Each (chunk, core) segment is packed in the native B layout by the runtime
    (`B_normal_to_native`) into one allocation per tensor (several when it exceeds chip.max_alloc_bytes), in an IOMMU
    domain with room for it (chip.domain_bytes each; domains fill in order).
  * Contexts are created per (M bucket, chunk, core), pinned to their core, the smallest bucket at load and the others
    on first use. They bind views: their B segment, the chunk's A region, their C region.

Per call (`run(a)`, a = (n_chunks, R, chunk_k) values, R <= the largest bucket of rows):
  * A is written once per chunk into an A scratch shared by the chunk's per-core contexts (native layout
    (chunk_k/sk, R_bucket, sk); rows beyond R are zeroed), in one strided copy that also casts to the element type,
    and synced to the device (cacheable memory); C is synced back after the runs.
  * the cores run in parallel: core i runs all its chunks' contexts in turn, cores 1.. on the pool's threads and
    core 0 on the caller's, then C is read for every chunk at once: the per-core C regions of a chunk are
    consecutive tiles of one native (N/s, R_bucket, s) array, so one transpose gives (n_chunks, R, N).
A and C scratch is shared by every weight of a domain and bucket (one matmul runs at a time: `Arena.lock`), so the
NPU memory beyond the weights is a few buffers, not one per tensor.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np

from . import layout as L
from .rknn import CORE_0, CORE_1, CORE_2, LAYOUT_NATIVE, MATMUL_TYPES, SYNC_FROM_DEVICE, SYNC_TO_DEVICE
from .runtime import MatmulInfo, Mem, Runtime

HOST_FUNCTIONS = ("pack_a", "unpack_c", "rotate", "set_threads")


def usable_host(module):
    """The C host module if it has every function this code calls, else None after one warning: a module built
    from older sources (an editable install not rebuilt after an update) would fail mid-call."""
    if module is not None and not all(hasattr(module, f) for f in HOST_FUNCTIONS):
        warnings.warn("npulm: the C host module (npulm.npu._host) was built from older sources; NPU host work runs "
                      "in numpy. Rebuild it: pip install -e . (or python setup.py build_ext --inplace)",
                      RuntimeWarning, stacklevel=2)
        return None
    return module


try:  # the host work in C (A packing, C epilogue); the numpy path otherwise
    from . import _host
except ImportError:  # pragma: no cover - the extension is optional
    _host = None
_host = usable_host(_host)
if _host is not None:
    _host.set_threads(min(4, os.cpu_count() or 1))  # rows split over the CPU's cores for large calls

log = logging.getLogger("npulm.npu")

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # token rows a context is made for (on first use); A rows padded up
SEGMENT_ALIGN = 64  # byte alignment of B segments inside an allocation
SCRATCH_SHARE = 8  # 1/8 of each IOMMU domain is kept free for the A/C scratch when placing weights
INT16_MAX = 32767
_CORE_MASKS = (CORE_0, CORE_1, CORE_2)


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def split_n(n: int, n_cores: int, align: int) -> list[tuple[int, int]]:
    """[start, stop) column ranges of padded N (whole `align` tiles, as even as possible) for up to n_cores cores."""
    tiles = ceil_to(n, align) // align
    k = max(1, min(n_cores, tiles))
    base, extra = divmod(tiles, k)
    out, s = [], 0
    for i in range(k):
        t = base + (i < extra)
        out.append((s * align, (s + t) * align))
        s += t
    return out


def equal_chunks(k: int, max_chunk: int, align: int) -> tuple[int, int]:
    """(chunk width, number of chunks): the fewest equal K-chunks of width <= max_chunk, width a multiple of align."""
    cap = max(align, max_chunk // align * align)
    n = -(-k // cap)
    return ceil_to(-(-k // n), align), n


def int16_safe_chunk(b_abs: np.ndarray, a_max: int, align: int, max_chunk: int) -> int:
    """Widest chunk width (multiple of `align`, <= max_chunk) such that for every equal-width chunk and every output
    column, a_max * sum_k |B[n, k]| <= 32767: then no INT4xINT4 -> INT16 partial can overflow, for any A with
    |A| <= a_max. A certificate from the weights themselves, usually several times the worst case 32767 // 64 = 511.
    b_abs is |B| as (N, K)."""
    n, k = b_abs.shape
    limit = INT16_MAX // a_max
    kp = ceil_to(k, align)
    t = kp // align
    gran = np.zeros((n, kp), np.int64)
    gran[:, :k] = b_abs
    cum = np.zeros((n, t + 1), np.int64)
    np.cumsum(gran.reshape(n, t, align).sum(axis=2), axis=1, out=cum[:, 1:])
    width = equal_chunks(k, max_chunk, align)[0]
    while True:
        w = width // align
        starts = np.arange(0, t, w)
        worst = (cum[:, np.minimum(starts + w, t)] - cum[:, starts]).max(initial=0)
        if worst <= limit:
            return width
        if width == align:
            raise ValueError(f"no K-chunk of {align} keeps INT16 partials below 2^15 for |A| <= {a_max}")
        width = equal_chunks(k, width - align, align)[0]


# ----------------------------------------------------------------------------------------------------- thread pool


class CorePool:
    """Persistent worker threads, one per NPU core beyond the first: `run(fn, groups)` calls fn(groups[0]) on the
    caller's thread and fn(groups[i]) on worker i-1, waits for all, and re-raises the first error."""

    def __init__(self, n_workers: int):
        self._jobs: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(n_workers)]
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, args=(q, self._done), daemon=True,
                                          name=f"npulm-npu-core{i + 1}") for i, q in enumerate(self._jobs)]
        for t in self._threads:
            t.start()

    @staticmethod
    def _work(jobs: queue.SimpleQueue, done: queue.SimpleQueue) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, arg = job
            try:
                fn(arg)
                done.put(None)
            except BaseException as e:  # handed to the caller
                done.put(e)

    @property
    def n_workers(self) -> int:
        return len(self._jobs)

    def run(self, fn: Callable[[object], None], groups: Sequence[object]) -> None:
        if len(groups) - 1 > len(self._jobs):
            raise ValueError(f"{len(groups)} groups for {len(self._jobs) + 1} threads")
        for q, g in zip(self._jobs, groups[1:]):
            q.put((fn, g))
        error = None
        try:
            fn(groups[0])
        except BaseException as e:
            error = e
        for _ in range(len(groups) - 1):
            r = self._done.get()
            if r is not None and error is None:
                error = r
        if error is not None:
            raise error

    def close(self) -> None:
        for q in self._jobs:
            q.put(None)


# ----------------------------------------------------------------------------------------------------- memory


class _Scratch:
    """One shared A or C buffer of a (domain, bucket): grows by replacement, old ones live while bound."""

    def __init__(self, arena: Arena, domain: int, size: int):
        self.domain, self.size = domain, size
        self.mem = arena.alloc(domain, size)
        self._finalizer = weakref.finalize(self, arena.free, domain, self.mem)


class Arena:
    """Everything one runtime's weights share: IOMMU domain accounting, an anchor context per domain to allocate
    with, the A/C scratch, the lock that serialises NPU calls, and the core thread pool."""

    def __init__(self, rt: Runtime, parallel: bool | None = None, buckets: Sequence[int] = BUCKETS,
                 scratch_share: int = SCRATCH_SHARE):
        self.rt, self.chip = rt, rt.chip
        self.buckets = tuple(sorted(set(buckets)))
        self.lock = threading.RLock()
        self.used = [0] * self.chip.n_domains  # bytes allocated per IOMMU domain
        self.weight_bytes = [0] * self.chip.n_domains  # of which weights (placement keeps these under the cap)
        self.scratch_reserve = self.chip.domain_bytes // scratch_share
        self._anchors: dict[int, int] = {}
        # weak: a scratch buffer is freed once no context binds it (e.g. after the model is dropped)
        self._scratch: weakref.WeakValueDictionary[tuple[int, str, int], _Scratch] = weakref.WeakValueDictionary()
        # Parallel cores by default; the emulator is mostly one Python thread per run anyway, so its default is the
        # caller's thread alone (same results, less hand-off overhead).
        if parallel is None:
            parallel = rt.kind != "emulator"
        n = self.chip.n_cores if self.chip.core_masks else 1
        self.pool = CorePool(n - 1) if parallel and n > 1 else None
        self.n_core_slices = n

    # -- allocation ------------------------------------------------------------------------------------------------

    def _anchor(self, domain: int) -> int:
        """A tiny context of the domain that owns allocations (rknn_create_mem needs a context)."""
        ctx = self._anchors.get(domain)
        if ctx is None:
            t = min(self.chip.matmul_types)
            k, n = self.chip.padded_align(t)
            ctx, _ = self.rt.create(MatmulInfo(1, k, n, t, LAYOUT_NATIVE, AC_layout=LAYOUT_NATIVE,
                                               iommu_domain_id=domain))
            self._anchors[domain] = ctx
        return ctx

    def place(self, nbytes: int) -> int:
        """The first IOMMU domain with room for nbytes of weights (keeping the scratch share free)."""
        cap = self.chip.domain_bytes - self.scratch_reserve
        for d, used in enumerate(self.weight_bytes):
            if used + nbytes <= cap:
                self.weight_bytes[d] += nbytes
                return d
        raise MemoryError(f"no IOMMU domain has {nbytes} bytes free ({self.chip.n_domains} domains of "
                          f"{self.chip.domain_bytes} bytes)")

    def alloc(self, domain: int, size: int) -> Mem:
        mem = self.rt.create_mem(self._anchor(domain), size)
        self.used[domain] += size
        return mem

    def free(self, domain: int, mem: Mem) -> None:
        ctx = self._anchors.get(domain)
        if ctx is None or mem.handle is None:
            return
        self.rt.destroy_mem(ctx, mem)
        self.used[domain] -= mem.size

    def scratch(self, domain: int, kind: str, rows: int, size: int) -> _Scratch:
        key = (domain, kind, rows)
        s = self._scratch.get(key)
        if s is None or s.size < size:
            s = _Scratch(self, domain, size)
            self._scratch[key] = s
        return s

    def release_scratch(self) -> None:
        """Drop the arena's hold on the scratch buffers (each is freed once no context binds it)."""
        self._scratch.clear()

    def run_cores(self, groups: list[list[int]]) -> None:
        """Run the contexts of each core group (in order within a group), the groups in parallel."""
        run = self.rt.run

        def run_group(ctxs: list[int]) -> None:
            for c in ctxs:
                run(c)

        if self.pool is None or len(groups) == 1:
            for g in groups:
                run_group(g)
        else:
            self.pool.run(run_group, groups)

    def close(self) -> None:
        self._scratch.clear()
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        for ctx in self._anchors.values():
            try:
                self.rt.destroy(ctx)
            except Exception:  # a dead runtime: nothing left to free
                pass
        self._anchors.clear()


# ----------------------------------------------------------------------------------------------------- one weight


class _Bucket:
    """The contexts of one M bucket: per core the list of (chunk) contexts, and the scratch they bind."""

    def __init__(self, rows: int, ctxs: list[list[int]], views: list[tuple[int, Mem]], a: _Scratch, c: _Scratch,
                 a_arr: np.ndarray, c_arr: np.ndarray):
        self.rows, self.ctxs, self.views, self.a, self.c = rows, ctxs, views, a, c
        # typed views of the scratch: A (nch, K/sk, rows, sk) (int4: sk/2 bytes), C (nch, N/s, rows, s)
        self.a_arr, self.c_arr = a_arr, c_arr


class NpuMatmul:
    """One weight on the NPU: per call, A (n_chunks, R, chunk_k) -> C (n_chunks, R, N) in the output element type.

    b: (N, K) logical values of the matmul type's B element type (float for fp16; integers for int8/int4).
    row_factor: NPU rows per token row (row-expanded pipelines): buckets are BUCKETS x row_factor rows.
    """

    def __init__(self, arena: Arena, b: np.ndarray, mm_type: int, chunk_k: int, row_factor: int = 1,
                 name: str = "", eager: bool = True):
        self.arena, self.rt, self.chip, self.type, self.name = arena, arena.rt, arena.chip, mm_type, name
        self.a_dt, self.b_dt, self.c_dt = MATMUL_TYPES[mm_type]
        if not self.chip.supports(mm_type):
            from .rknn import RknnParamInvalid

            raise RknnParamInvalid(-5, "rknn_matmul_create", f"matmul type {mm_type} is not accepted on "
                                                             f"{self.chip.name}")
        k_al, n_al = self.chip.padded_align(mm_type)
        if chunk_k % k_al or chunk_k > self.chip.max_k:
            raise ValueError(f"chunk_k={chunk_k} must be a multiple of {k_al} and <= {self.chip.max_k}")
        self.n, self.k = b.shape
        self.chunk_k = chunk_k
        self.n_chunks = -(-self.k // chunk_k)
        self.row_factor = row_factor
        self.slices = split_n(self.n, arena.n_core_slices, n_al)
        self.n_pad = self.slices[-1][1]
        self.a_sub, _, _, self.c_sub = self.chip.tiles(mm_type)
        self.buckets: dict[int, _Bucket] = {}
        self._by_m: dict[int, _Bucket] = {}  # token rows -> its bucket
        self.allocs: list[Mem] = []
        self.domain, self.b_bytes = 0, 0
        self._closed = False
        self._pack(b)
        if eager:
            self.bucket(1)

    # -- load ------------------------------------------------------------------------------------------------------

    def _segment_bytes(self, n_cols: int) -> int:
        _, sn, sk, _ = self.chip.tiles(self.type)
        return L.nbytes(self.b_dt, L.b_native_count(self.chunk_k, n_cols, sn, sk, self.chip.b_split_k))

    def _pack(self, b: np.ndarray) -> None:
        """Pad, cut and pack B into the native segments of one (or more) allocations."""
        sizes = [self._segment_bytes(n1 - n0) for n0, n1 in self.slices]
        self._check_b_sizes(sizes)
        seg = [(j, i) for j in range(self.n_chunks) for i in range(len(self.slices))]
        # group segments into allocations of at most max_alloc_bytes
        groups, cur, total = [], [], 0
        for j, i in seg:
            s = ceil_to(sizes[i], SEGMENT_ALIGN)
            if cur and total + s > self.chip.max_alloc_bytes:
                groups.append((cur, total))
                cur, total = [], 0
            cur.append((j, i, total))
            total += s
        groups.append((cur, total))
        need = sum(t for _, t in groups)
        self.domain = self.arena.place(need)
        self.b_bytes = need
        self.offsets: dict[tuple[int, int], tuple[Mem, int]] = {}
        kp = self.n_chunks * self.chunk_k
        dtype = np.float16 if self.b_dt == "fp16" else np.int8
        bp = np.zeros((self.n_pad, kp), dtype)
        bp[: self.n, : self.k] = b
        info = MatmulInfo(1, self.chunk_k, 0, self.type, LAYOUT_NATIVE, AC_layout=LAYOUT_NATIVE,
                          iommu_domain_id=self.domain)
        try:
            for members, total in groups:
                mem = self.arena.alloc(self.domain, total)
                self.allocs.append(mem)
                for j, i, off in members:
                    n0, n1 = self.slices[i]
                    info.N = n1 - n0
                    block = bp[n0:n1, j * self.chunk_k:(j + 1) * self.chunk_k]
                    self.rt.B_normal_to_native(block.T, info, mem.data[off: off + sizes[i]])
                    self.offsets[(j, i)] = (mem, off)
                self.rt.mem_sync(self.arena._anchor(self.domain), mem, SYNC_TO_DEVICE)
        except BaseException:
            self.close()
            raise

    def _check_b_sizes(self, sizes: list[int]) -> None:
        """Native B sizes from npulm's tile table against the runtime's io_attr.B.size, before anything is packed:
        a board whose tiles differ would have the layout helper write past a segment. A mismatch is an RknnError,
        so the weight falls back to the CPU path like any other NPU refusal."""
        from .rknn import RknnParamInvalid

        for width, want in {n1 - n0: sz for (n0, n1), sz in zip(self.slices, sizes)}.items():
            ctx, io = self.rt.create(MatmulInfo(1, self.chunk_k, width, self.type, LAYOUT_NATIVE,
                                                AC_layout=LAYOUT_NATIVE))
            try:
                if io.B.size != want:
                    raise RknnParamInvalid(-5, "rknn_matmul_create", f"native B of K={self.chunk_k} N={width} is "
                                                                     f"{io.B.size} bytes on this runtime, npulm's "
                                                                     f"tiles give {want}")
            finally:
                self.rt.destroy(ctx)

    def bucket(self, m: int) -> _Bucket:
        """The contexts for m token rows (created on first use)."""
        got = self._by_m.get(m)
        if got is not None:
            return got
        rows_m = next((b for b in self.arena.buckets if b >= m), None)
        if rows_m is None:
            raise ValueError(f"{m} rows exceed the largest bucket {self.arena.buckets[-1]}")
        got = self.buckets.get(rows_m)
        if got is None:
            got = self.buckets[rows_m] = self._create(rows_m * self.row_factor)
        self._by_m[m] = got
        return got

    def _create(self, rows: int) -> _Bucket:
        rt, nch, kc = self.rt, self.n_chunks, self.chunk_k
        a_bytes = L.nbytes(self.a_dt, kc * rows)
        c_bytes = L.nbytes(self.c_dt, self.n_pad * rows)
        a_s = self.arena.scratch(self.domain, "A", rows, nch * a_bytes)
        c_s = self.arena.scratch(self.domain, "C", rows, nch * c_bytes)
        ctxs: list[list[int]] = [[] for _ in self.slices]
        views: list[tuple[int, Mem]] = []
        created: list[int] = []
        pinned = len(self.slices) > 1 and bool(self.chip.core_masks)
        try:
            for j in range(nch):
                for i, (n0, n1) in enumerate(self.slices):
                    info = MatmulInfo(rows, kc, n1 - n0, self.type, LAYOUT_NATIVE, AC_layout=LAYOUT_NATIVE,
                                      iommu_domain_id=self.domain)
                    ctx, io = rt.create(info)
                    created.append(ctx)
                    if pinned:
                        rt.set_core_mask(ctx, _CORE_MASKS[i])
                    if io.A.size != a_bytes or io.C.size != L.nbytes(self.c_dt, (n1 - n0) * rows):
                        from .rknn import RknnParamInvalid  # an NPU refusal: the CPU path takes the weight

                        raise RknnParamInvalid(-5, "rknn_matmul_create", f"unexpected native sizes A {io.A.size} / "
                                                                         f"C {io.C.size} for {info}")
                    b_mem, b_off = self.offsets[(j, i)]
                    for mem, off, attr in ((a_s.mem, j * a_bytes, io.A), (b_mem, b_off, io.B),
                                           (c_s.mem, j * c_bytes + L.nbytes(self.c_dt, n0 * rows), io.C)):
                        v = rt.create_mem_view(ctx, mem, off, attr.size)
                        views.append((ctx, v))
                        rt.set_io_mem(ctx, v, attr)
                    ctxs[i].append(ctx)
        except BaseException:
            for ctx, v in views:
                rt.destroy_mem(ctx, v)
            for ctx in created:
                rt.destroy(ctx)
            raise
        if self.a_dt == "int4":
            a_arr = a_s.mem.data[: nch * a_bytes].reshape(nch, kc // self.a_sub, rows, self.a_sub // 2)
        else:
            a_arr = a_s.mem.view(self.a_dt, (nch, kc // self.a_sub, rows, self.a_sub))
        c_arr = c_s.mem.view(self.c_dt, (nch, self.n_pad // self.c_sub, rows, self.c_sub))
        return _Bucket(rows, ctxs, views, a_s, c_s, a_arr, c_arr)

    # -- call ------------------------------------------------------------------------------------------------------

    def run(self, a: np.ndarray, m: int | None = None) -> np.ndarray:
        """a: (n_chunks, R, chunk_k) values (any real dtype holding the element type's values; R = m * row_factor)
        -> C (n_chunks, R, N), a view of the shared scratch: use it before the next call (hold `arena.lock`)."""
        c = self.run_native(a, m)
        nch, r = c.shape[0], c.shape[2]
        if r == 1:
            out = c.reshape(nch, 1, self.n_pad)
        else:
            out = c.transpose(0, 2, 1, 3).reshape(nch, r, self.n_pad)
        return out[:, :, : self.n]

    def run_native(self, a: np.ndarray, m: int | None = None) -> np.ndarray:
        """As `run`, but C stays in the native layout: (n_chunks, N_pad / s, R, s), C[j, r, n] at [j, n // s, r, n % s]
        (no copy: epilogues that reduce over chunks read it in place)."""
        nch, r, kc = a.shape
        if nch != self.n_chunks or kc != self.chunk_k:
            raise ValueError(f"A must be ({self.n_chunks}, R, {self.chunk_k}), got {a.shape}")
        bk = self.bucket(-(-r // self.row_factor) if m is None else m)
        self._write_a(bk, a, r)
        rt, anchor = self.rt, bk.ctxs[0][0]
        rt.mem_sync(anchor, bk.a.mem, SYNC_TO_DEVICE)  # A was written through the CPU cache: flush it
        self.arena.run_cores(bk.ctxs)
        rt.mem_sync(anchor, bk.c.mem, SYNC_FROM_DEVICE)
        return bk.c_arr[:, :, :r, :]

    def run_rows(self, x: np.ndarray, scale: np.ndarray, kind: int) -> tuple[np.ndarray, int]:
        """x (m, K) -> native C (n_chunks, N_pad / s, rows, s) and its row count, A packed by the C extension in
        one pass: kind 0: fp16(x / scale) from float32, kind 1: int8 rint(x / scale) from float64 (scale per row;
        0 reads as 1), kind 2: as 0 with W16A16's power-of-two row scales computed into `scale`, kind 3: int8 codes
        and residual codes, 2m rows (row_factor 2; scale (2m,), the residuals' half computed). Only for fp16 /
        int8 A; callers check `_host`."""
        m = x.shape[0]
        bk = self.bucket(m)
        _host.pack_a(x, scale, bk.a_arr, m, self.k, self.n_chunks, self.chunk_k, bk.rows, self.a_sub, kind)
        rt, anchor = self.rt, bk.ctxs[0][0]
        rt.mem_sync(anchor, bk.a.mem, SYNC_TO_DEVICE)
        self.arena.run_cores(bk.ctxs)
        rt.mem_sync(anchor, bk.c.mem, SYNC_FROM_DEVICE)
        return bk.c_arr, bk.rows

    def _write_a(self, bk: _Bucket, a: np.ndarray, r: int) -> None:
        nch, kc, sub = self.n_chunks, self.chunk_k, self.a_sub
        dst = bk.a_arr
        if self.a_dt == "int4":
            v = a.astype(np.int8, copy=False).reshape(nch, r, kc // sub, sub // 2, 2).view(np.uint8)
            even, odd = v[..., 0] & 0x0F, v[..., 1] & 0x0F
            src = (even | (odd << 4)) if self.rt.nibbles.a_native == "low" else ((even << 4) | odd)
        else:
            src = a.reshape(nch, r, kc // sub, sub)
        np.copyto(dst[:, :, :r, :], src.transpose(0, 2, 1, 3), casting="unsafe")
        if r < bk.rows:
            dst[:, :, r:, :] = 0

    # -- lifetime --------------------------------------------------------------------------------------------------

    @property
    def n_contexts(self) -> int:
        return sum(len(c) for bk in self.buckets.values() for c in bk.ctxs)

    def close(self) -> None:
        """Destroy the contexts and free the weight's NPU memory (idempotent)."""
        if self._closed:
            return
        self._closed = True
        rt = self.rt
        for bk in self.buckets.values():
            for ctx, v in bk.views:
                try:
                    rt.destroy_mem(ctx, v)
                except Exception:  # a failed runtime: keep freeing the rest
                    pass
            for ctxs in bk.ctxs:
                for ctx in ctxs:
                    try:
                        rt.destroy(ctx)
                    except Exception:
                        pass
        self.buckets.clear()
        self._by_m.clear()
        for mem in self.allocs:
            try:
                self.arena.free(self.domain, mem)
            except Exception:
                pass
        self.allocs.clear()
        self.arena.weight_bytes[self.domain] -= self.b_bytes
        self.b_bytes = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return (f"NpuMatmul({self.name}, type {self.type}, N={self.n} K={self.k} in {self.n_chunks} x {self.chunk_k}, "
                f"{len(self.slices)} core slices, domain {self.domain})")
