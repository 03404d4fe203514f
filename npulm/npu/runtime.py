"""The one matmul-runtime interface: librknnrt through ctypes (`RknnRuntime`) or the numpy emulator
(`npulm.npu.emulator.EmulatorRuntime`), so pipelines never know which one they talk to.

`Runtime` mirrors the C API one call for one call (contexts are integer handles, errors are `RknnError`
subclasses); `MatmulContext` is the convenience object pipelines use:

    rt = open_runtime()                                   # librknnrt when found, else the emulator
    mm = MatmulContext(rt, M, K, N, INT8_MM_INT8_TO_INT32, core_mask=CORE_1)
    mm.set_B(w_int8.T)                                    # once: packed to the native layout, synced to the device
    c = mm(a_int8)                                        # per call: write A, run, read C -> (M, N) int32
"""

from __future__ import annotations

import ctypes
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import layout as L
from .chips import Chip, chip_from_env_or_board, detect_chip, get_chip
from .rknn import (
    CORE_AUTO,
    LAYOUT_NATIVE,
    LAYOUT_NORM,
    LAYOUT_TP_NORM,
    MATMUL_TYPES,
    MAX_NAME_LEN,
    MEMORY_FLAGS_DEFAULT,
    QUANT_PER_LAYER_SYM,
    SYNC_TO_DEVICE,
    TENSOR_TYPE_OF,
    RknnError,
    RknnLib,
    RknnLoadError,
    RknnMallocFail,
    RknnMatmulInfo,
    RknnMatmulIoAttr,
    RknnMatmulShape,
    RknnMatmulTensorAttr,
    RknnQuantParams,
    check,
    find_library,
    rknn_context,
)

log = logging.getLogger("npulm.npu")
_DTYPE_OF_TENSOR = {v: k for k, v in TENSOR_TYPE_OF.items()}

# ----------------------------------------------------------------------------------------------------- value types


@dataclass
class MatmulInfo:
    """rknn_matmul_info. Layout/quant fields default to 0 as after the C `memset`."""

    M: int
    K: int
    N: int
    type: int
    B_layout: int = LAYOUT_NORM
    B_quant_type: int = QUANT_PER_LAYER_SYM
    AC_layout: int = LAYOUT_NORM
    AC_quant_type: int = 0
    iommu_domain_id: int = 0
    group_size: int = 0

    def to_c(self) -> RknnMatmulInfo:
        c = RknnMatmulInfo()  # zeroed, reserved bytes included
        for f in ("M", "K", "N", "type", "B_layout", "B_quant_type", "AC_layout", "AC_quant_type",
                  "iommu_domain_id", "group_size"):
            setattr(c, f, getattr(self, f))
        return c


@dataclass
class TensorAttr:
    """rknn_matmul_tensor_attr: `size` is the byte count to allocate, `dims` the (native) shape."""

    name: str
    dims: tuple[int, ...]
    size: int
    type: int  # rknn_tensor_type
    raw: RknnMatmulTensorAttr | None = field(default=None, repr=False, compare=False)  # as returned by librknnrt

    @property
    def dtype(self) -> str:
        return _DTYPE_OF_TENSOR[self.type]

    @classmethod
    def from_c(cls, c: RknnMatmulTensorAttr) -> TensorAttr:
        copy = RknnMatmulTensorAttr()
        ctypes.memmove(ctypes.byref(copy), ctypes.byref(c), ctypes.sizeof(c))
        return cls(c.name.decode(errors="replace"), tuple(c.dims[: c.n_dims]), c.size, c.type, copy)

    def to_c(self) -> RknnMatmulTensorAttr:
        if self.raw is not None:
            return self.raw
        c = RknnMatmulTensorAttr()
        c.name = self.name.encode()[: MAX_NAME_LEN - 1]
        c.n_dims = len(self.dims)
        for i, d in enumerate(self.dims):
            c.dims[i] = d
        c.size, c.type = self.size, self.type
        return c


@dataclass
class IoAttr:
    A: TensorAttr
    B: TensorAttr
    C: TensorAttr


@dataclass
class QuantParams:
    """rknn_quant_params for the tensor `name` (io_attr.X.name): float32 scales, int32 zero points (may be empty)."""

    name: str
    scale: np.ndarray
    zp: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    def __post_init__(self) -> None:
        self.scale = np.ascontiguousarray(self.scale, dtype=np.float32).reshape(-1)
        self.zp = np.ascontiguousarray(self.zp, dtype=np.int32).reshape(-1)


class Mem:
    """NPU-visible memory (rknn_tensor_mem): `data` is a writable uint8 numpy view of its `size` bytes.

    After writing a buffer the NPU reads across runs (B), call `Runtime.mem_sync(ctx, mem)`: the hardware needs it
    for cacheable memory, and the emulator re-reads B only then (it caches the unpacked B between runs).
    """

    def __init__(self, data: np.ndarray, fd: int, offset: int, flags: int, virt_addr: int, phys_addr: int,
                 handle: object):
        self.data, self.size = data, int(data.size)
        self.fd, self.offset, self.flags, self.virt_addr, self.phys_addr = fd, offset, flags, virt_addr, phys_addr
        self.handle = handle  # the implementation's own object (ctypes pointer or emulator buffer)

    def view(self, dtype: str | np.dtype, shape: Sequence[int] | None = None, offset: int = 0) -> np.ndarray:
        """A typed view (element type name like "fp16" or a numpy dtype) of the bytes from `offset`."""
        dt = np.dtype(L.NP_DTYPES[dtype] if isinstance(dtype, str) else dtype)
        count = int(np.prod(shape)) if shape is not None else (self.size - offset) // dt.itemsize
        v = self.data[offset: offset + count * dt.itemsize].view(dt)
        return v.reshape(shape) if shape is not None else v

    def __repr__(self) -> str:
        return f"Mem(size={self.size}, fd={self.fd}, offset={self.offset})"


# ----------------------------------------------------------------------------------------------------- interface


class Runtime(ABC):
    """The matmul API, one method per C function. `ctx` is an integer handle."""

    kind: str  # "rknn" or "emulator"
    chip: Chip
    sdk_version: str
    driver_version: str = ""
    nibbles: L.NibbleOrder  # int4 packing MatmulContext uses for A and the normal layouts

    @abstractmethod
    def create(self, info: MatmulInfo) -> tuple[int, IoAttr]: ...

    @abstractmethod
    def create_dynamic_shape(self, info: MatmulInfo, shapes: Sequence[tuple[int, int, int]]
                             ) -> tuple[int, list[IoAttr]]: ...

    @abstractmethod
    def set_dynamic_shape(self, ctx: int, shape: tuple[int, int, int]) -> None: ...

    @abstractmethod
    def set_core_mask(self, ctx: int, core_mask: int) -> None: ...

    @abstractmethod
    def set_quant_params(self, ctx: int, params: QuantParams) -> None: ...

    @abstractmethod
    def get_quant_params(self, ctx: int, name: str) -> tuple[QuantParams, float]: ...

    @abstractmethod
    def create_mem(self, ctx: int, size: int, flags: int = MEMORY_FLAGS_DEFAULT) -> Mem: ...

    @abstractmethod
    def create_mem_from_fd(self, ctx: int, fd: int, size: int, offset: int = 0, virt_addr: int = 0) -> Mem: ...

    @abstractmethod
    def destroy_mem(self, ctx: int, mem: Mem) -> None: ...

    @abstractmethod
    def mem_sync(self, ctx: int, mem: Mem, mode: int = SYNC_TO_DEVICE) -> None: ...

    @abstractmethod
    def set_io_mem(self, ctx: int, mem: Mem, attr: TensorAttr) -> None: ...

    @abstractmethod
    def run(self, ctx: int) -> None: ...

    @abstractmethod
    def destroy(self, ctx: int) -> None: ...

    @abstractmethod
    def B_normal_to_native(self, b: np.ndarray, info: MatmulInfo, out: np.ndarray | None = None) -> np.ndarray:
        """rknn_B_normal_layout_to_native_layout: B (K, N) logical values (int4 as int8 in [-8, 7]) -> native bytes
        (uint8), written into `out` (at least io_attr.B.size bytes, e.g. a Mem's data) when given."""

    def create_mem_view(self, ctx: int, parent: Mem, offset: int, size: int) -> Mem:
        """A Mem for `size` bytes of `parent` from `offset` (rknn_create_mem_from_fd), e.g. one core's weight slice."""
        return self.create_mem_from_fd(ctx, parent.fd, size, parent.offset + offset, parent.virt_addr + offset)

    def describe(self) -> str:
        return f"{self.kind} matmul runtime, chip {self.chip.name}, SDK {self.sdk_version}"

    def close(self) -> None:  # noqa: B027  optional hook: contexts are destroyed by their owners
        """Release what the runtime itself holds."""


# ----------------------------------------------------------------------------------------------------- librknnrt


class RknnRuntime(Runtime):
    """librknnrt through ctypes."""

    kind = "rknn"

    def __init__(self, lib_path: str | None = None, chip: Chip | str | None = None,
                 nibbles: L.NibbleOrder | None = None):
        self.lib = RknnLib(lib_path)
        self.sdk_version, self.driver_version = self.lib.sdk_version, self.lib.driver_version
        if isinstance(chip, str):
            chip = get_chip(chip)
        if chip is None:
            chip = detect_chip()
            if chip is None:
                chip = chip_from_env_or_board()
                log.warning("no Rockchip chip in the device tree; using %s rules for packing", chip.name)
        self.chip = chip
        self.nibbles = nibbles or L.NibbleOrder()
        self._io: dict[int, list[RknnMatmulIoAttr]] = {}  # keeps the C structs alive per context

    def _ctx(self, ctx: int) -> rknn_context:
        return rknn_context(ctx)

    def create(self, info: MatmulInfo) -> tuple[int, IoAttr]:
        c_ctx, c_info, io = rknn_context(0), info.to_c(), RknnMatmulIoAttr()
        check(self.lib.rknn_matmul_create(ctypes.byref(c_ctx), ctypes.byref(c_info), ctypes.byref(io)),
              "rknn_matmul_create", _describe(info))
        self._io[c_ctx.value] = [io]
        return c_ctx.value, IoAttr(TensorAttr.from_c(io.A), TensorAttr.from_c(io.B), TensorAttr.from_c(io.C))

    def create_dynamic_shape(self, info: MatmulInfo, shapes: Sequence[tuple[int, int, int]]
                             ) -> tuple[int, list[IoAttr]]:
        if self.lib.rknn_matmul_create_dynamic_shape is None:
            raise RknnError(-1, "rknn_matmul_create_dynamic_shape", f"not in librknnrt {self.sdk_version}")
        n = len(shapes)
        c_shapes = (RknnMatmulShape * n)(*[RknnMatmulShape(*s) for s in shapes])
        ios = (RknnMatmulIoAttr * n)()
        c_ctx, c_info = rknn_context(0), info.to_c()
        check(self.lib.rknn_matmul_create_dynamic_shape(ctypes.byref(c_ctx), ctypes.byref(c_info), n, c_shapes, ios),
              "rknn_matmul_create_dynamic_shape", _describe(info))
        self._io[c_ctx.value] = [ios]
        return c_ctx.value, [IoAttr(TensorAttr.from_c(io.A), TensorAttr.from_c(io.B), TensorAttr.from_c(io.C))
                             for io in ios]

    def set_dynamic_shape(self, ctx: int, shape: tuple[int, int, int]) -> None:
        s = RknnMatmulShape(*shape)
        check(self.lib.rknn_matmul_set_dynamic_shape(self._ctx(ctx), ctypes.byref(s)), "rknn_matmul_set_dynamic_shape")

    def set_core_mask(self, ctx: int, core_mask: int) -> None:
        check(self.lib.rknn_matmul_set_core_mask(self._ctx(ctx), core_mask), "rknn_matmul_set_core_mask",
              f"core mask {core_mask:#x}")

    def set_quant_params(self, ctx: int, params: QuantParams) -> None:
        p = RknnQuantParams()
        p.name = params.name.encode()[: MAX_NAME_LEN - 1]
        p.scale = params.scale.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        p.scale_len = params.scale.size
        if params.zp.size:
            p.zp, p.zp_len = params.zp.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)), params.zp.size
        check(self.lib.rknn_matmul_set_quant_params(self._ctx(ctx), ctypes.byref(p)), "rknn_matmul_set_quant_params",
              params.name)

    def get_quant_params(self, ctx: int, name: str) -> tuple[QuantParams, float]:
        if self.lib.rknn_matmul_get_quant_params is None:
            raise RknnError(-1, "rknn_matmul_get_quant_params", f"not in librknnrt {self.sdk_version}")
        p, scale = RknnQuantParams(), ctypes.c_float(0)
        p.name = name.encode()[: MAX_NAME_LEN - 1]
        check(self.lib.rknn_matmul_get_quant_params(self._ctx(ctx), ctypes.byref(p), ctypes.byref(scale)),
              "rknn_matmul_get_quant_params", name)
        s = np.ctypeslib.as_array(p.scale, (p.scale_len,)).copy() if p.scale and p.scale_len > 0 else np.zeros(0)
        z = np.ctypeslib.as_array(p.zp, (p.zp_len,)).copy() if p.zp and p.zp_len > 0 else np.zeros(0)
        return QuantParams(p.name.decode(errors="replace"), s, z), float(scale.value)

    def _wrap(self, ptr, function: str, size: int) -> Mem:
        if not ptr:
            raise RknnMallocFail(-4, function, f"{size} bytes")
        m = ptr.contents
        data = np.ctypeslib.as_array((ctypes.c_uint8 * m.size).from_address(m.virt_addr)) if m.size else \
            np.zeros(0, np.uint8)
        return Mem(data, m.fd, m.offset, m.flags, m.virt_addr or 0, m.phys_addr, ptr)

    def create_mem(self, ctx: int, size: int, flags: int = MEMORY_FLAGS_DEFAULT) -> Mem:
        if flags == MEMORY_FLAGS_DEFAULT and size < 1 << 32:
            return self._wrap(self.lib.rknn_create_mem(self._ctx(ctx), size), "rknn_create_mem", size)
        if self.lib.rknn_create_mem2 is None:
            raise RknnError(-1, "rknn_create_mem2", f"not in librknnrt {self.sdk_version}")
        return self._wrap(self.lib.rknn_create_mem2(self._ctx(ctx), size, flags), "rknn_create_mem2", size)

    def create_mem_from_fd(self, ctx: int, fd: int, size: int, offset: int = 0, virt_addr: int = 0) -> Mem:
        if self.lib.rknn_create_mem_from_fd is None:
            raise RknnError(-1, "rknn_create_mem_from_fd", f"not in librknnrt {self.sdk_version}")
        ptr = self.lib.rknn_create_mem_from_fd(self._ctx(ctx), fd, virt_addr or None, size, offset)
        return self._wrap(ptr, "rknn_create_mem_from_fd", size)

    def destroy_mem(self, ctx: int, mem: Mem) -> None:
        if mem.handle is None:
            return
        mem.data = np.zeros(0, np.uint8)  # the bytes go away with the struct: drop our view first
        check(self.lib.rknn_destroy_mem(self._ctx(ctx), mem.handle), "rknn_destroy_mem")
        mem.handle = None

    def mem_sync(self, ctx: int, mem: Mem, mode: int = SYNC_TO_DEVICE) -> None:
        if self.lib.rknn_mem_sync is not None:  # 1.6.0+; absent means the runtime flushes itself
            check(self.lib.rknn_mem_sync(self._ctx(ctx), mem.handle, mode), "rknn_mem_sync")

    def set_io_mem(self, ctx: int, mem: Mem, attr: TensorAttr) -> None:
        c_attr = attr.to_c()
        check(self.lib.rknn_matmul_set_io_mem(self._ctx(ctx), mem.handle, ctypes.byref(c_attr)),
              "rknn_matmul_set_io_mem", attr.name)

    def run(self, ctx: int) -> None:
        check(self.lib.rknn_matmul_run(self._ctx(ctx)), "rknn_matmul_run")

    def destroy(self, ctx: int) -> None:
        self._io.pop(ctx, None)
        check(self.lib.rknn_matmul_destroy(self._ctx(ctx)), "rknn_matmul_destroy")

    def B_normal_to_native(self, b: np.ndarray, info: MatmulInfo, out: np.ndarray | None = None) -> np.ndarray:
        b_dt = MATMUL_TYPES[info.type][1]
        k, n = b.shape
        _, sn, sk, _ = self.chip.tiles(info.type)
        size = L.nbytes(b_dt, L.b_native_count(k, n, sn, sk, self.chip.b_split_k))
        if out is None:
            out = np.zeros(size, np.uint8)
        if self.lib.rknn_B_normal_layout_to_native_layout is None:  # SDK 2.0: pack in Python with the chip's tiles
            raw = L.to_bytes(L.b_to_native(b, sn, sk, self.chip.b_split_k), b_dt, self.nibbles.b_native)
            out[: raw.size] = raw
            return out
        if out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError("out must be a contiguous uint8 buffer")
        src = np.ascontiguousarray(L.to_bytes(b, b_dt, self.nibbles.normal))
        c_info = info.to_c()
        c_info.B_layout = LAYOUT_NATIVE
        check(self.lib.rknn_B_normal_layout_to_native_layout(src.ctypes.data, out.ctypes.data, k, n,
                                                             ctypes.byref(c_info)),
              "rknn_B_normal_layout_to_native_layout")
        return out


def _describe(info: MatmulInfo) -> str:
    return (f"M={info.M} K={info.K} N={info.N} type={info.type} B_layout={info.B_layout} "
            f"AC_layout={info.AC_layout}")


# ----------------------------------------------------------------------------------------------------- selection

RUNTIME_ENV = "NPULM_NPU_RUNTIME"  # auto | rknn | emulator


def open_runtime(kind: str | None = None, chip: Chip | str | None = None, lib_path: str | None = None,
                 **emulator_options) -> Runtime:
    """librknnrt when `kind` is "rknn", or "auto" (default, or $NPULM_NPU_RUNTIME) and the library is found; the
    emulator otherwise. The choice is logged and visible as `runtime.kind` / `runtime.describe()`."""
    kind = (kind or os.environ.get(RUNTIME_ENV) or "auto").lower()
    if kind not in ("auto", "rknn", "emulator"):
        raise ValueError(f"runtime kind must be auto, rknn or emulator, not {kind!r}")
    if kind in ("auto", "rknn"):
        path = lib_path or find_library()
        if path or kind == "rknn":
            try:
                rt: Runtime = RknnRuntime(path, chip)
                log.info("NPU: %s (%s)", rt.describe(), rt.lib.path)
                return rt
            except RknnLoadError as e:
                if kind == "rknn":
                    raise
                log.warning("NPU: %s; falling back to the emulator", e)
    from .emulator import EmulatorRuntime

    rt = EmulatorRuntime(chip, **emulator_options)
    log.info("NPU: %s", rt.describe())
    return rt


# ----------------------------------------------------------------------------------------------------- convenience


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
            raw = L.to_bytes(L.a_to_native(a, self.io.A.dims[2]), self.a_dtype, self.rt.nibbles.a_native)
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
            c = L.c_from_native(flat.reshape(c_attr.dims), self.N)
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


__all__ = ["IoAttr", "MatmulContext", "MatmulInfo", "Mem", "QuantParams", "RknnRuntime", "Runtime", "TensorAttr",
           "open_runtime"]
