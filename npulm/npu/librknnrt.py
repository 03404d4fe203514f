"""`RknnRuntime`: the `Runtime` interface on librknnrt through ctypes (the binding itself is `npulm.npu.rknn`)."""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence

import numpy as np

from . import layout as L
from .chips import Chip, chip_from_env_or_board, detect_chip, get_chip
from .rknn import (
    LAYOUT_NATIVE,
    MATMUL_TYPES,
    MAX_NAME_LEN,
    MEMORY_FLAGS_DEFAULT,
    SYNC_TO_DEVICE,
    RknnError,
    RknnLib,
    RknnMallocFail,
    RknnMatmulIoAttr,
    RknnMatmulShape,
    RknnQuantParams,
    check,
    parse_version,
    rknn_context,
)
from .runtime import IoAttr, MatmulInfo, Mem, QuantParams, Runtime, TensorAttr

log = logging.getLogger("npulm.npu")


class RknnRuntime(Runtime):
    """librknnrt through ctypes."""

    kind = "rknn"

    def __init__(self, lib_path: str | None = None, chip: Chip | str | None = None,
                 nibbles: L.NibbleOrder | None = None):
        self.lib = RknnLib(lib_path)
        self.sdk_version, self.driver_version = self.lib.sdk_version, self.lib.driver_version
        v = parse_version(self.sdk_version)
        # rknn_B_normal_layout_to_native_layout: SDK 2.0.x takes (B_in, B_out, K, N, subN, subK, type); 2.1 changed it
        # to (B_in, B_out, K, N, rknn_matmul_info *) [rknn-matmul-api.md 1, headers TK2@77b7109 / @deaba85]
        self._b_layout_2_0 = v is not None and v[:2] < (2, 1) and \
            self.lib.rknn_B_normal_layout_to_native_layout is not None
        if self._b_layout_2_0:
            self.lib.rknn_B_normal_layout_to_native_layout.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                                                       ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                                                       ctypes.c_int]
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
        if self.lib.rknn_B_normal_layout_to_native_layout is None:  # no helper: pack in Python with the chip's tiles
            raw = L.to_bytes(L.b_to_native(b, sn, sk, self.chip.b_split_k), b_dt, self.nibbles.b_native)
            out[: raw.size] = raw
            return out
        if out.dtype != np.uint8 or not out.flags.c_contiguous:
            raise ValueError("out must be a contiguous uint8 buffer")
        src = np.ascontiguousarray(L.to_bytes(b, b_dt, self.nibbles.normal))
        if self._b_layout_2_0:  # the tiles npulm packs with, passed explicitly (the 2.1+ form takes them from info)
            check(self.lib.rknn_B_normal_layout_to_native_layout(src.ctypes.data, out.ctypes.data, k, n, sn, sk,
                                                                 info.type),
                  "rknn_B_normal_layout_to_native_layout", f"SDK {self.sdk_version} form, subN={sn} subK={sk}")
            return out
        c_info = info.to_c()
        c_info.B_layout = LAYOUT_NATIVE
        check(self.lib.rknn_B_normal_layout_to_native_layout(src.ctypes.data, out.ctypes.data, k, n,
                                                             ctypes.byref(c_info)),
              "rknn_B_normal_layout_to_native_layout")
        return out


def _describe(info: MatmulInfo) -> str:
    return (f"M={info.M} K={info.K} N={info.N} type={info.type} B_layout={info.B_layout} "
            f"AC_layout={info.AC_layout}")
