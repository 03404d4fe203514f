"""The one matmul-runtime interface: the value types of the RKNPU2 matmul API and `Runtime`, the abstract class its two
implementations fill in, so pipelines never know which one they talk to:

  `npulm.npu.librknnrt.RknnRuntime`   librknnrt through ctypes (a board)
  `npulm.npu.emulator.EmulatorRuntime` the same API in numpy (any machine)

`Runtime` mirrors the C API one call for one call (contexts are integer handles, errors are `RknnError` subclasses).
`npulm.npu.device.open_runtime()` picks one; `npulm.npu.context.MatmulContext` is the convenience object over a
context (write B once, then write A, run, read C).
"""

from __future__ import annotations

import ctypes
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import layout as L
from .chips import Chip
from .rknn import (
    LAYOUT_NORM,
    MAX_NAME_LEN,
    MEMORY_FLAGS_DEFAULT,
    QUANT_PER_LAYER_SYM,
    SYNC_TO_DEVICE,
    TENSOR_TYPE_OF,
    RknnMatmulInfo,
    RknnMatmulTensorAttr,
)

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


__all__ = ["IoAttr", "MatmulInfo", "Mem", "QuantParams", "Runtime", "TensorAttr"]
