"""The RKNPU2 matmul API in numpy, for machines without an NPU: same calls, validation, error codes and buffers.

Numerics:
  FP16 inputs   A and B are fp16; products are accumulated in float32 (BLAS sgemm; `fp_accumulate="float64"` uses
                dgemm), then emitted as fp32, or rounded to fp16 / bf16 (round-to-nearest-even). The hardware's
                accumulation order is undocumented, so float results match it only to rounding.
  Integer       INT8xINT8->INT32, INT4xINT4->INT16 and INT8xINT4->INT32 are exact: float32 BLAS over K-chunks
                short enough that every partial sum stays below 2^24, chunk sums added in float64.
                INT16 overflow (possible for K > ~670 with extreme int4 codes) follows `int16_overflow`:
                "saturate" (default; saturate vs wrap is unverified on hardware), "wrap" or "raise".
  Quantized     types 3, 5-9, 11, 12, 15 follow the demo's formulas C = sum_k (A - zpA)(B - zpB) * sA*sB/sC; INT8
                outputs are rounded per `int8_rounding` and saturated. Per-group scales are read as
                [N][K/group] (`group_scale_order="NK"`, or "KN"); that order is unverified.
Memory: the emulator reads B through a cache of its unpacked values, refreshed when B is bound again, when its
quant params change, or after `mem_sync(ctx, mem, SYNC_TO_DEVICE)` on it (what cacheable NPU memory needs too).
A and C are read and written on every run.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import layout as L
from .chips import Chip, chip_from_env_or_board, get_chip
from .rknn import (
    CORE_AUTO,
    LAYOUT_NATIVE,
    LAYOUT_NORM,
    LAYOUT_TP_NORM,
    MATMUL_TYPES,
    MEM_FLAG_ALLOC_NO_CONTEXT,
    MEMORY_FLAGS_DEFAULT,
    QUANT_PER_CHANNEL_ASYM,
    QUANT_PER_CHANNEL_SYM,
    QUANT_PER_GROUP_ASYM,
    QUANT_PER_GROUP_SYM,
    QUANT_PER_LAYER_SYM,
    SYNC_TO_DEVICE,
    TENSOR_MEMORY_ALLOC_INSIDE,
    TENSOR_MEMORY_FROM_FD,
    RknnError,
)
from .runtime import IoAttr, MatmulInfo, Mem, QuantParams, Runtime, TensorAttr

ERR_FAIL, ERR_MALLOC, ERR_PARAM, ERR_CTX, ERR_INPUT, ERR_OUTPUT = -1, -4, -5, -7, -8, -9
EMULATED_SDK = "2.3.2 (npulm emulator)"
_F32_EXACT = 1 << 24  # integers up to 2^24 are exact in float32


class EmulatorOverflowError(ArithmeticError):
    """An INT16 output overflowed with int16_overflow="raise"."""


def _fail(code: int, function: str, detail: str) -> RknnError:
    return RknnError(code, function, detail)


@dataclass
class _Buffer:
    """One allocation (rknn_create_mem); fd imports of it share `data`. `gen` counts device syncs."""

    data: np.ndarray
    fd: int
    domain: int
    iova: int
    gen: int = 0
    alive: bool = True


@dataclass
class _Ctx:
    info: MatmulInfo
    shapes: list[tuple[int, int, int]]
    ios: list[IoAttr]
    cur: int = 0
    core_mask: int = CORE_AUTO
    quant: dict[str, QuantParams] = field(default_factory=dict)
    mems: dict[str, Mem] = field(default_factory=dict)
    b_cache: tuple[tuple, np.ndarray] | None = None

    @property
    def io(self) -> IoAttr:
        return self.ios[self.cur]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.shapes[self.cur]


class EmulatorRuntime(Runtime):
    kind = "emulator"

    def __init__(self, chip: Chip | str | None = None, *, nibbles: L.NibbleOrder | None = None,
                 int16_overflow: str = "saturate", int8_rounding: str = "half_even", fp_accumulate: str = "float32",
                 group_scale_order: str = "NK"):
        self.chip = get_chip(chip) if isinstance(chip, str) else (chip or chip_from_env_or_board())
        self.sdk_version = EMULATED_SDK
        self.driver_version = "emulated"
        self.nibbles = nibbles or L.NibbleOrder()
        _choice("int16_overflow", int16_overflow, ("saturate", "wrap", "raise"))
        _choice("int8_rounding", int8_rounding, ("half_even", "half_away", "floor", "truncate"))
        _choice("fp_accumulate", fp_accumulate, ("float32", "float64"))
        _choice("group_scale_order", group_scale_order, ("NK", "KN"))
        self.int16_overflow, self.int8_rounding = int16_overflow, int8_rounding
        self.fp_accumulate, self.group_scale_order = fp_accumulate, group_scale_order
        self._lock = threading.Lock()
        self._ctxs: dict[int, _Ctx] = {}
        self._ctx_ids = itertools.count(0x1000)
        self._fds = itertools.count(1000)  # fake dma-buf fds
        self._buffers: dict[int, _Buffer] = {}  # by fd
        self._domain_used = [0] * self.chip.n_domains
        self._iova = 0x1000_0000

    def describe(self) -> str:
        return super().describe() + (f", int16 overflow {self.int16_overflow}, fp accumulate {self.fp_accumulate}")

    # ------------------------------------------------------------------------------------------------ contexts

    def _get(self, ctx: int, function: str) -> _Ctx:
        c = self._ctxs.get(ctx)
        if c is None:
            raise _fail(ERR_CTX, function, f"no context {ctx:#x}")
        return c

    def _validate(self, info: MatmulInfo, m: int, k: int, n: int, function: str) -> IoAttr:
        chip, t = self.chip, info.type
        if t not in MATMUL_TYPES:
            raise _fail(ERR_PARAM, function, f"unknown matmul type {t}")
        if not chip.supports(t):
            raise _fail(ERR_PARAM, function, f"unsupported matmul type {t} on {chip.name} "
                                             f"(accepted: {sorted(chip.matmul_types)})")
        if min(m, k, n) < 1:
            raise _fail(ERR_PARAM, function, f"M, K, N must be positive, got {m}, {k}, {n}")
        if k > chip.k_limit:
            raise _fail(ERR_PARAM, function, f"K={k} > limit {chip.k_limit}")
        k_al, n_al = chip.align(t)
        if k % k_al:
            raise _fail(ERR_PARAM, function, f"K={k} must be aligned to {k_al} for type {t} on {chip.name}")
        if n % n_al:
            raise _fail(ERR_PARAM, function, f"N={n} must be aligned to {n_al} for type {t} on {chip.name}")
        a_dt, b_dt, _ = MATMUL_TYPES[t]
        if info.B_layout not in (LAYOUT_NORM, LAYOUT_NATIVE, LAYOUT_TP_NORM):
            raise _fail(ERR_PARAM, function, f"bad B_layout {info.B_layout}")
        if info.AC_layout not in (LAYOUT_NORM, LAYOUT_NATIVE):
            raise _fail(ERR_PARAM, function, f"bad AC_layout {info.AC_layout}")
        if b_dt == "int4" and info.B_layout != LAYOUT_NATIVE and not chip.int4_b_normal:
            raise _fail(ERR_PARAM, function, f"int4 B needs the native layout on {chip.name}")
        if info.AC_quant_type != 0:
            raise _fail(ERR_PARAM, function, "AC_quant_type must be 0 (per layer)")
        if not QUANT_PER_LAYER_SYM <= info.B_quant_type <= QUANT_PER_GROUP_ASYM:
            raise _fail(ERR_PARAM, function, f"bad B_quant_type {info.B_quant_type}")
        if info.B_quant_type and b_dt == "fp16":
            raise _fail(ERR_PARAM, function, "B quantization needs an integer B")
        if info.B_quant_type in (QUANT_PER_GROUP_SYM, QUANT_PER_GROUP_ASYM):
            if info.group_size <= 0 or k % info.group_size:
                raise _fail(ERR_PARAM, function, f"group_size {info.group_size} must divide K={k}")
        if not 0 <= info.iommu_domain_id < chip.n_domains:
            raise _fail(ERR_PARAM, function, f"iommu_domain_id {info.iommu_domain_id} not in [0, {chip.n_domains})")
        a, b, c = L.io_shapes(chip, t, m, k, n, info.B_layout, info.AC_layout)
        return IoAttr(*(TensorAttr(name, s.dims, s.size, s.tensor_type) for name, s in zip("ABC", (a, b, c))))

    def _new_ctx(self, info: MatmulInfo, shapes: list[tuple[int, int, int]], ios: list[IoAttr]) -> int:
        with self._lock:
            ctx = next(self._ctx_ids)
            self._ctxs[ctx] = _Ctx(MatmulInfo(**vars(info)), shapes, ios)
        return ctx

    def create(self, info: MatmulInfo) -> tuple[int, IoAttr]:
        io = self._validate(info, info.M, info.K, info.N, "rknn_matmul_create")
        return self._new_ctx(info, [(info.M, info.K, info.N)], [io]), io

    def create_dynamic_shape(self, info: MatmulInfo, shapes: Sequence[tuple[int, int, int]]
                             ) -> tuple[int, list[IoAttr]]:
        fn = "rknn_matmul_create_dynamic_shape"
        shapes = [tuple(int(v) for v in s) for s in shapes]
        if not shapes:
            raise _fail(ERR_PARAM, fn, "no shapes")
        if len({(k, n) for _, k, n in shapes}) != 1:
            raise _fail(ERR_PARAM, fn, "only M may vary between dynamic shapes")
        ios = [self._validate(info, m, k, n, fn) for m, k, n in shapes]
        return self._new_ctx(info, shapes, ios), ios

    def set_dynamic_shape(self, ctx: int, shape: tuple[int, int, int]) -> None:
        c = self._get(ctx, "rknn_matmul_set_dynamic_shape")
        shape = tuple(int(v) for v in shape)
        if shape not in c.shapes:
            raise _fail(ERR_PARAM, "rknn_matmul_set_dynamic_shape", f"{shape} is not one of {c.shapes}")
        c.cur = c.shapes.index(shape)

    def set_core_mask(self, ctx: int, core_mask: int) -> None:
        fn = "rknn_matmul_set_core_mask"
        c = self._get(ctx, fn)
        if not self.chip.core_masks:
            raise _fail(ERR_FAIL, fn, f"{self.chip.name} has one NPU core")
        if core_mask not in self.chip.core_masks:
            raise _fail(ERR_PARAM, fn, f"core mask {core_mask:#x} not valid on {self.chip.name}")
        c.core_mask = core_mask

    def set_quant_params(self, ctx: int, params: QuantParams) -> None:
        fn = "rknn_matmul_set_quant_params"
        c = self._get(ctx, fn)
        names = {c.io.A.name: "A", c.io.B.name: "B", c.io.C.name: "C"}
        which = names.get(params.name)
        if which is None:
            raise _fail(ERR_PARAM, fn, f"no tensor named {params.name!r}")
        _, k, n = c.shape
        want = 1
        if which == "B" and c.info.B_quant_type in (QUANT_PER_CHANNEL_SYM, QUANT_PER_CHANNEL_ASYM):
            want = n
        elif which == "B" and c.info.B_quant_type in (QUANT_PER_GROUP_SYM, QUANT_PER_GROUP_ASYM):
            want = n * k // c.info.group_size
        if params.scale.size != want or params.zp.size not in (0, want):
            raise _fail(ERR_PARAM, fn, f"{which} needs {want} scales (and 0 or {want} zero points), got "
                                       f"{params.scale.size} and {params.zp.size}")
        c.quant[which] = QuantParams(params.name, params.scale.copy(), params.zp.copy())
        if which == "B":
            c.b_cache = None

    def get_quant_params(self, ctx: int, name: str) -> tuple[QuantParams, float]:
        # The hardware returns B's scales "after scale normalization" (INT8->INT32, per-channel B); how it
        # normalizes is undocumented, so the emulator cannot give the same numbers.
        self._get(ctx, "rknn_matmul_get_quant_params")
        raise _fail(ERR_FAIL, "rknn_matmul_get_quant_params", "scale normalization is not emulated")

    def destroy(self, ctx: int) -> None:
        self._get(ctx, "rknn_matmul_destroy")
        with self._lock:
            del self._ctxs[ctx]

    # ------------------------------------------------------------------------------------------------ memory

    def create_mem(self, ctx: int, size: int, flags: int = MEMORY_FLAGS_DEFAULT) -> Mem:
        fn = "rknn_create_mem" if flags == MEMORY_FLAGS_DEFAULT else "rknn_create_mem2"
        domain = 0
        if not flags & MEM_FLAG_ALLOC_NO_CONTEXT:
            domain = self._get(ctx, fn).info.iommu_domain_id
        if size <= 0 or size > self.chip.max_alloc_bytes:
            raise _fail(ERR_MALLOC, fn, f"{size} bytes (limit {self.chip.max_alloc_bytes} per allocation)")
        with self._lock:
            if self._domain_used[domain] + size > self.chip.domain_bytes:
                raise _fail(ERR_MALLOC, fn, f"IOMMU domain {domain} full: {self._domain_used[domain]} + {size} bytes "
                                            f"> {self.chip.domain_bytes}")
            self._domain_used[domain] += size
            fd = next(self._fds)
            buf = _Buffer(np.zeros(size, np.uint8), fd, domain, self._iova)
            self._iova += -(-size // 4096) * 4096
            self._buffers[fd] = buf
        return Mem(buf.data, fd, 0, TENSOR_MEMORY_ALLOC_INSIDE, buf.data.ctypes.data, buf.iova, buf)

    def create_mem_from_fd(self, ctx: int, fd: int, size: int, offset: int = 0, virt_addr: int = 0) -> Mem:
        fn = "rknn_create_mem_from_fd"
        self._get(ctx, fn)
        buf = self._buffers.get(fd)
        if buf is None or not buf.alive:
            raise _fail(ERR_MALLOC, fn, f"no emulator buffer with fd {fd}")
        if offset < 0 or size <= 0 or offset + size > buf.data.size:
            raise _fail(ERR_MALLOC, fn, f"[{offset}, {offset + size}) outside the {buf.data.size}-byte buffer")
        data = buf.data[offset: offset + size]
        return Mem(data, fd, offset, TENSOR_MEMORY_FROM_FD, data.ctypes.data, buf.iova + offset, buf)

    def destroy_mem(self, ctx: int, mem: Mem) -> None:
        buf = mem.handle
        if not isinstance(buf, _Buffer):
            raise _fail(ERR_PARAM, "rknn_destroy_mem", "not an emulator memory")
        if mem.flags == TENSOR_MEMORY_ALLOC_INSIDE and buf.alive:
            with self._lock:
                buf.alive = False
                self._domain_used[buf.domain] -= buf.data.size
                del self._buffers[buf.fd]
        mem.handle = None

    def mem_sync(self, ctx: int, mem: Mem, mode: int = SYNC_TO_DEVICE) -> None:
        if isinstance(mem.handle, _Buffer) and mode & SYNC_TO_DEVICE:
            mem.handle.gen += 1

    def domain_usage(self, domain: int = 0) -> int:
        """Bytes allocated in an IOMMU domain."""
        return self._domain_used[domain]

    # ------------------------------------------------------------------------------------------------ run

    def set_io_mem(self, ctx: int, mem: Mem, attr: TensorAttr) -> None:
        fn = "rknn_matmul_set_io_mem"
        c = self._get(ctx, fn)
        io = c.io
        which = {io.A.name: "A", io.B.name: "B", io.C.name: "C"}.get(attr.name)
        if which is None:
            raise _fail(ERR_PARAM, fn, f"no tensor named {attr.name!r}")
        if not isinstance(mem.handle, _Buffer) or not mem.handle.alive:
            raise _fail(ERR_PARAM, fn, f"{which}: not a live emulator memory")
        need = getattr(io, which).size
        if mem.size < need:
            raise _fail(ERR_PARAM, fn, f"{which} memory has {mem.size} bytes, needs {need}")
        c.mems[which] = mem
        if which == "B":
            c.b_cache = None

    def run(self, ctx: int) -> None:
        fn = "rknn_matmul_run"
        c = self._get(ctx, fn)
        for which, code in (("A", ERR_INPUT), ("B", ERR_INPUT), ("C", ERR_OUTPUT)):
            mem = c.mems.get(which)
            if mem is None or mem.handle is None or not mem.handle.alive:
                raise _fail(code, fn, f"no memory bound for {which}")
            if mem.size < getattr(c.io, which).size:
                raise _fail(code, fn, f"{which} memory too small for shape {c.shape}")
        m, k, n = c.shape
        a_dt, b_dt, c_dt = MATMUL_TYPES[c.info.type]
        a = self._read_A(c, m, k, a_dt)
        q = {w: c.quant.get(w) for w in "ABC"}
        s_a, zp_a = _per_layer(q["A"])
        s_c, zp_c = _per_layer(q["C"])
        if c_dt in ("int32", "int16"):
            # Integer outputs are the raw exact sums; scales only matter to the caller.
            b = self._B(c, k, n, b_dt, dequant=False)
            af = a.astype(np.float32)
            if zp_a:
                af -= np.float32(zp_a)
            acc = _exact_matmul(af, b, _max_abs(a_dt, zp_a), self._b_bound(c, b_dt))
            out = self._to_int16(acc) if c_dt == "int16" else acc.astype(np.int32)
        else:
            float_a = a_dt == "fp16"
            acc_t = np.float64 if (self.fp_accumulate == "float64" or not float_a) else np.float32
            b = self._B(c, k, n, b_dt, dequant=True, acc_t=acc_t)
            af = a.astype(acc_t)
            if zp_a and not float_a:
                af -= zp_a
            y = af @ b
            scale = s_a / s_c
            if scale != 1.0:
                y *= scale
            out = self._convert(y, c_dt, zp_c)
        self._write_C(c, out, c_dt)

    def _read_A(self, c: _Ctx, m: int, k: int, dtype: str) -> np.ndarray:
        attr, mem = c.io.A, c.mems["A"]
        count = int(np.prod(attr.dims))
        if c.info.AC_layout == LAYOUT_NATIVE:
            flat = L.from_bytes(mem.data, dtype, count, self.nibbles.a_native)
            return L.rows_from_native(flat.reshape(attr.dims), k)
        return L.from_bytes(mem.data, dtype, count, self.nibbles.normal).reshape(m, k)

    def _write_C(self, c: _Ctx, out: np.ndarray, dtype: str) -> None:
        attr, mem = c.io.C, c.mems["C"]
        if c.info.AC_layout == LAYOUT_NATIVE:
            out = L.rows_to_native(out, attr.dims[2])
        raw = np.ascontiguousarray(out).reshape(-1).view(np.uint8)
        mem.data[: raw.size] = raw

    def _B(self, c: _Ctx, k: int, n: int, dtype: str, *, dequant: bool, acc_t=np.float32) -> np.ndarray:
        """B (K, N) as float values, cached per context until B is rebound, re-synced or requantized.
        dequant=False: the integers (B - zp); dequant=True: (B - zp) * scale in `acc_t`."""
        mem = c.mems["B"]
        buf: _Buffer = mem.handle
        key = (id(buf), buf.gen, mem.offset, k, n, dequant, np.dtype(acc_t).str)
        if c.b_cache is not None and c.b_cache[0] == key:
            return c.b_cache[1]
        layout = c.info.B_layout
        if layout == LAYOUT_NATIVE:
            _, sn, sk, _ = self.chip.tiles(c.info.type)
            count = L.b_native_count(k, n, sn, sk, self.chip.b_split_k)
            flat = L.from_bytes(mem.data, dtype, count, self.nibbles.b_native)
            b = L.b_from_native(flat, k, n, sn, sk, self.chip.b_split_k, out=np.empty((k, n), acc_t))
        elif layout == LAYOUT_TP_NORM:
            b = L.from_bytes(mem.data, dtype, n * k, self.nibbles.normal).reshape(n, k).T.astype(acc_t, order="C")
        else:
            b = L.from_bytes(mem.data, dtype, k * n, self.nibbles.normal).reshape(k, n).astype(acc_t)
        qb = c.quant.get("B")
        if qb is not None and (qb.zp.size or dequant):
            qt = c.info.B_quant_type
            if qt in (QUANT_PER_GROUP_SYM, QUANT_PER_GROUP_ASYM):
                g = c.info.group_size
                order = "NK" if self.group_scale_order == "NK" else "KN"
                shape = (n, k // g) if order == "NK" else (k // g, n)

                def per_k(v: np.ndarray) -> np.ndarray:  # (N, K/G) or (K/G, N) -> (K, N)
                    v = v.reshape(shape)
                    return np.repeat(v.T if order == "NK" else v, g, axis=0)
                if qb.zp.size:
                    b -= per_k(qb.zp).astype(acc_t)
                if dequant:
                    b *= per_k(qb.scale).astype(acc_t)
            else:  # per layer (length 1) or per channel (length N) broadcast along K
                if qb.zp.size:
                    b -= qb.zp.astype(acc_t)
                if dequant:
                    b *= qb.scale.astype(acc_t)
        c.b_cache = (key, b)
        return b

    def _b_bound(self, c: _Ctx, dtype: str) -> int:
        qb = c.quant.get("B")
        return _max_abs(dtype, int(np.abs(qb.zp).max()) if qb is not None and qb.zp.size else 0)

    def _to_int16(self, acc: np.ndarray) -> np.ndarray:
        lo, hi = -(1 << 15), (1 << 15) - 1
        if self.int16_overflow == "wrap":
            return acc.astype(np.int16)  # two's-complement truncation of int64
        over = (acc < lo) | (acc > hi)
        if over.any() and self.int16_overflow == "raise":
            raise EmulatorOverflowError(f"INT16 output overflow in {int(over.sum())} elements "
                                        f"(range {int(acc.min())}..{int(acc.max())})")
        return np.clip(acc, lo, hi).astype(np.int16)

    def _convert(self, y: np.ndarray, dtype: str, zp_c: int) -> np.ndarray:
        if dtype == "fp32":
            return y.astype(np.float32)
        if dtype == "fp16":
            return y.astype(np.float16)  # numpy rounds to nearest even (float64 -> fp16 directly, no double rounding)
        if dtype == "bf16":
            return _to_bf16_bits(y.astype(np.float32))
        if dtype == "int8":
            return np.clip(_round(y, self.int8_rounding) + zp_c, -128, 127).astype(np.int8)
        raise AssertionError(dtype)

    # ------------------------------------------------------------------------------------------------ layout

    def B_normal_to_native(self, b: np.ndarray, info: MatmulInfo, out: np.ndarray | None = None) -> np.ndarray:
        fn = "rknn_B_normal_layout_to_native_layout"
        if info.type not in MATMUL_TYPES or not self.chip.supports(info.type):
            raise _fail(ERR_PARAM, fn, f"unsupported matmul type {info.type} on {self.chip.name}")
        b_dt = MATMUL_TYPES[info.type][1]
        _, sn, sk, _ = self.chip.tiles(info.type)
        raw = L.to_bytes(L.b_to_native(np.asarray(b), sn, sk, self.chip.b_split_k), b_dt, self.nibbles.b_native)
        if out is None:
            return raw
        if out.size < raw.size:
            raise _fail(ERR_PARAM, fn, f"output has {out.size} bytes, needs {raw.size}")
        out[: raw.size] = raw
        return out


# ---------------------------------------------------------------------------------------------------- numerics


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def _per_layer(q: QuantParams | None) -> tuple[float, int]:
    """A's / C's (scale, zero point); default 1.0 and 0 as the API documents."""
    if q is None:
        return 1.0, 0
    return float(q.scale[0]), int(q.zp[0]) if q.zp.size else 0


def _max_abs(dtype: str, zp: int) -> int:
    return {"int8": 128, "int4": 8}[dtype] + abs(zp)


def _exact_matmul(a: np.ndarray, b: np.ndarray, a_max: int, b_max: int) -> np.ndarray:
    """Exact integer A @ B (float32 operands holding integers) as int64, via float32 BLAS on K-chunks whose
    partial sums cannot reach 2^24."""
    k = a.shape[1]
    chunk = max(1, _F32_EXACT // (a_max * b_max))
    if chunk >= k:
        return (a @ b).astype(np.int64)
    acc = np.zeros((a.shape[0], b.shape[1]), np.float64)
    for s in range(0, k, chunk):
        acc += a[:, s: s + chunk] @ b[s: s + chunk]
    return acc.astype(np.int64)


def _round(y: np.ndarray, mode: str) -> np.ndarray:
    if mode == "half_even":
        return np.rint(y)
    if mode == "half_away":
        return np.sign(y) * np.floor(np.abs(y) + 0.5)
    if mode == "floor":
        return np.floor(y)
    return np.trunc(y)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded
