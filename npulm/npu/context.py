"""`MatmulContext`: one matmul context with its A, B, C memories, over any `Runtime`:

    rt = open_runtime()                                   # librknnrt when found, else the emulator
    mm = MatmulContext(rt, M, K, N, INT8_MM_INT8_TO_INT32, core_mask=CORE_1)
    mm.set_B(w_int8.T)                                    # once: packed to the native layout, synced to the device
    c = mm(a_int8)                                        # per call: write A, run, read C -> (M, N) int32

Pipelines use `npulm.npu.planner.NpuMatmul` (many contexts sharing scratch); this object serves tests, probes and
`npulm doctor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from . import layout as L
from .rknn import CORE_AUTO, LAYOUT_NATIVE, LAYOUT_TP_NORM, MATMUL_TYPES, QUANT_PER_LAYER_SYM, SYNC_TO_DEVICE
from .runtime import MatmulInfo, Mem, QuantParams, Runtime, TensorAttr


class MatmulContext:
    """One matmul context with its A, B, C memories: create for (M, K, N, type, layouts, core), write B once,
    then per call write A, run, read C.

    `M` may be a sequence of row counts: the context is then created with dynamic shapes (one per M), A and C are
    sized for the largest, and `select_m(m)` (or calling with an A of m rows) switches shape.
    `A_mem` / `B_mem` = (Mem, byte offset) bind a slice of a shared buffer instead of allocating, e.g. one weight
    buffer whose per-core N-slices several contexts read, or one A buffer shared by the per-core contexts.
    """

    def __init__(self, rt: Runtime, M: int | Sequence[int], K: int, N: int, mm_type: int, *,
                 B_layout: int = LAYOUT_NATIVE, AC_layout: int = LAYOUT_NATIVE, core_mask: int = CORE_AUTO,
                 iommu_domain_id: int = 0, B_quant_type: int = QUANT_PER_LAYER_SYM, group_size: int = 0,
                 A_mem: tuple[Mem, int] | None = None, B_mem: tuple[Mem, int] | None = None):
        self.rt, self.K, self.N, self.type = rt, K, N, mm_type
        self.a_dtype, self.b_dtype, self.c_dtype = MATMUL_TYPES[mm_type]
        ms = [M] if isinstance(M, int) else sorted(set(M))
        self.info = MatmulInfo(ms[-1], K, N, mm_type, B_layout, B_quant_type, AC_layout,
                               iommu_domain_id=iommu_domain_id, group_size=group_size)
        self.ctx: int | None = None
        self._own: list[Mem] = []
        if isinstance(M, int):
            self.ctx, io = rt.create(self.info)
            self.ios = {M: io}
        else:
            self.ctx, ios = rt.create_dynamic_shape(self.info, [(m, K, N) for m in ms])
            self.ios = dict(zip(ms, ios))
        try:
            self.M = ms[-1]
            self.io = self.ios[self.M]
            if core_mask != CORE_AUTO:
                rt.set_core_mask(self.ctx, core_mask)
            big = self.ios[ms[-1]]
            self.A = self._mem(big.A.size, A_mem)
            self.B = self._mem(self.io.B.size, B_mem)
            self.C = self._mem(big.C.size, None)
            if len(self.ios) > 1:
                rt.set_dynamic_shape(self.ctx, (self.M, K, N))
            for mem, attr in ((self.A, self.io.A), (self.B, self.io.B), (self.C, self.io.C)):
                rt.set_io_mem(self.ctx, mem, attr)
        except BaseException:
            self.close()
            raise

    def _mem(self, size: int, shared: tuple[Mem, int] | None) -> Mem:
        if shared is None:
            mem = self.rt.create_mem(self.ctx, size)
        else:
            mem = self.rt.create_mem_view(self.ctx, shared[0], shared[1], size)
        self._own.append(mem)
        return mem

    # -- shapes ------------------------------------------------------------------------------------------------------

    @property
    def Ms(self) -> list[int]:
        return list(self.ios)

    def select_m(self, m: int) -> None:
        """Switch a dynamic-shape context to M = m (one of `Ms`)."""
        if m == self.M:
            return
        if m not in self.ios:
            raise ValueError(f"M={m} is not one of this context's shapes {self.Ms}")
        self.rt.set_dynamic_shape(self.ctx, (m, self.K, self.N))
        self.M, self.io = m, self.ios[m]
        self.rt.set_io_mem(self.ctx, self.A, self.io.A)
        self.rt.set_io_mem(self.ctx, self.C, self.io.C)

    # -- B -----------------------------------------------------------------------------------------------------------

    def set_B(self, b: np.ndarray) -> None:
        """Write B (K, N) logical values (fp16-convertible floats, int8, or int4 values as ints) in the context's
        B layout, then sync it to the device. Pass a transposed view for (N, K) weights: no copy is made for it."""
        if b.shape != (self.K, self.N):
            raise ValueError(f"B must be ({self.K}, {self.N}), got {b.shape}")
        b = _as_dtype(b, self.b_dtype)
        if self.info.B_layout == LAYOUT_NATIVE:
            self.rt.B_normal_to_native(b, self.info, self.B.data[: self.io.B.size])
            self.rt.mem_sync(self.ctx, self.B, SYNC_TO_DEVICE)
            return
        if self.info.B_layout == LAYOUT_TP_NORM:
            raw = L.to_bytes(b.T, self.b_dtype, self.rt.nibbles.normal)
        else:
            raw = L.to_bytes(b, self.b_dtype, self.rt.nibbles.normal)
        self.write_B_bytes(raw)

    def write_B_bytes(self, raw: np.ndarray, offset: int = 0) -> None:
        """Write already-laid-out B bytes at `offset` and sync."""
        raw = np.asarray(raw, np.uint8).reshape(-1)
        self.B.data[offset: offset + raw.size] = raw
        self.rt.mem_sync(self.ctx, self.B, SYNC_TO_DEVICE)

    def set_quant_params(self, which: str, scale: np.ndarray | float, zp: np.ndarray | int | None = None) -> None:
        """Scales (and zero points) for "A", "B" or "C"."""
        attr = getattr(self.io, which)
        self.rt.set_quant_params(self.ctx, QuantParams(attr.name, np.atleast_1d(scale),
                                                       np.zeros(0) if zp is None else np.atleast_1d(zp)))

    # -- A, C, run ---------------------------------------------------------------------------------------------------

    def write_A(self, a: np.ndarray) -> None:
        """Write A (m, K) in the context's AC layout (m must be one of `Ms`; switches shape if needed)."""
        m, k = a.shape
        if k != self.K:
            raise ValueError(f"A must have K={self.K} columns, got {a.shape}")
        self.select_m(m)
        a = _as_dtype(a, self.a_dtype)
        if self.info.AC_layout == LAYOUT_NATIVE:
            raw = L.to_bytes(L.rows_to_native(a, self.io.A.dims[2]), self.a_dtype, self.rt.nibbles.a_native)
        else:
            raw = L.to_bytes(a, self.a_dtype, self.rt.nibbles.normal)
        self.A.data[: raw.size] = raw

    def run(self) -> None:
        self.rt.run(self.ctx)

    def read_C(self) -> np.ndarray:
        """C (M, N) as a new array of the output type (bf16 returned as float32)."""
        c_attr = self.io.C
        count = int(np.prod(c_attr.dims))
        flat = L.from_bytes(self.C.data, self.c_dtype, count)
        if self.info.AC_layout == LAYOUT_NATIVE:
            c = L.rows_from_native(flat.reshape(c_attr.dims), self.N)
        else:
            c = flat.reshape(self.M, self.N).copy()
        if self.c_dtype == "bf16":
            c = (c.astype(np.uint32) << 16).view(np.float32)
        return c

    def __call__(self, a: np.ndarray) -> np.ndarray:
        self.write_A(a)
        self.run()
        return self.read_C()

    # -- views, lifetime ---------------------------------------------------------------------------------------------

    def a_view(self) -> np.ndarray:
        """A's memory as a typed array shaped io.A.dims (int4: raw bytes)."""
        return _typed_view(self.A, self.io.A)

    def c_view(self) -> np.ndarray:
        """C's memory as a typed array shaped io.C.dims."""
        return _typed_view(self.C, self.io.C)

    def close(self) -> None:
        if self.ctx is None:
            return
        for mem in self._own:
            self.rt.destroy_mem(self.ctx, mem)
        self._own = []
        self.rt.destroy(self.ctx)
        self.ctx = None

    def __enter__(self) -> MatmulContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown or a dead runtime: nothing more to do
            pass

    def __repr__(self) -> str:
        return (f"MatmulContext(M={self.M}, K={self.K}, N={self.N}, type={self.type}, "
                f"B={L.layout_name(self.info.B_layout)}, AC={L.layout_name(self.info.AC_layout)}, {self.rt.kind})")


def _typed_view(mem: Mem, attr: TensorAttr) -> np.ndarray:
    if attr.dtype == "int4":
        return mem.data[: attr.size]
    return mem.view(attr.dtype, attr.dims)


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Logical values in the element type's numpy storage (floats rounded to fp16; ints range-checked)."""
    x = np.asarray(x)
    if dtype == "fp16":
        return x.astype(np.float16, copy=False)
    lo, hi = {"int8": (-128, 127), "int4": (-8, 7)}[dtype]
    if x.dtype.kind == "f":
        raise TypeError(f"{dtype} input must be integers, got {x.dtype}")
    if x.size and (x.min() < lo or x.max() > hi):
        raise ValueError(f"{dtype} values must be in [{lo}, {hi}]")
    return x.astype(np.int8, copy=False)
