"""ctypes binding of librknnrt's matmul API (RKNPU2 SDK 2.x headers `rknn_api.h` + `rknn_matmul_api.h`).

Only the 2.1+ struct layout is bound (the 2.0 layout differs only in a reserved field). 1.5.x/1.6.0 libraries pass
a 24-byte `rknn_matmul_info`, so they are refused at load: silently passing the 64-byte struct would compute garbage.
The constants, type tables and error classes here are also used by the emulator, so importing this module never
loads the library; `RknnLib` does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import re
from ctypes import POINTER, Structure, c_char, c_float, c_int, c_int8, c_int16, c_int32, c_uint32, c_uint64, c_void_p

log = logging.getLogger("npulm.npu")

# ---------------------------------------------------------------------------------------------------------- enums

# rknn_tensor_type
TENSOR_FLOAT32, TENSOR_FLOAT16, TENSOR_INT8, TENSOR_UINT8, TENSOR_INT16, TENSOR_UINT16 = 0, 1, 2, 3, 4, 5
TENSOR_INT32, TENSOR_UINT32, TENSOR_INT64, TENSOR_BOOL, TENSOR_INT4, TENSOR_BFLOAT16 = 6, 7, 8, 9, 10, 11

# rknn_matmul_type
FLOAT16_MM_FLOAT16_TO_FLOAT32 = 1
INT8_MM_INT8_TO_INT32 = 2
INT8_MM_INT8_TO_INT8 = 3
FLOAT16_MM_FLOAT16_TO_FLOAT16 = 4
FLOAT16_MM_INT8_TO_FLOAT32 = 5
FLOAT16_MM_INT8_TO_FLOAT16 = 6
FLOAT16_MM_INT4_TO_FLOAT32 = 7
FLOAT16_MM_INT4_TO_FLOAT16 = 8
INT8_MM_INT8_TO_FLOAT32 = 9
INT4_MM_INT4_TO_INT16 = 10
INT8_MM_INT4_TO_INT32 = 11
FLOAT16_MM_INT4_TO_BFLOAT16 = 12
INT8_MM_INT4_TO_FLOAT16 = 15

# Element types of (A, B, C) per matmul type. Element type names: fp32 fp16 bf16 int32 int16 int8 int4.
MATMUL_TYPES: dict[int, tuple[str, str, str]] = {
    1: ("fp16", "fp16", "fp32"),
    2: ("int8", "int8", "int32"),
    3: ("int8", "int8", "int8"),
    4: ("fp16", "fp16", "fp16"),
    5: ("fp16", "int8", "fp32"),
    6: ("fp16", "int8", "fp16"),
    7: ("fp16", "int4", "fp32"),
    8: ("fp16", "int4", "fp16"),
    9: ("int8", "int8", "fp32"),
    10: ("int4", "int4", "int16"),
    11: ("int8", "int4", "int32"),
    12: ("fp16", "int4", "bf16"),
    15: ("int8", "int4", "fp16"),
}
TENSOR_TYPE_OF = {"fp32": TENSOR_FLOAT32, "fp16": TENSOR_FLOAT16, "int8": TENSOR_INT8, "int16": TENSOR_INT16,
                  "int32": TENSOR_INT32, "int4": TENSOR_INT4, "bf16": TENSOR_BFLOAT16}
ELEMENT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "int32": 32, "int16": 16, "int8": 8, "int4": 4}

# rknn_matmul_layout
LAYOUT_NORM, LAYOUT_NATIVE, LAYOUT_TP_NORM = 0, 1, 2
# rknn_matmul_quant_type
QUANT_PER_LAYER_SYM, QUANT_PER_LAYER_ASYM, QUANT_PER_CHANNEL_SYM = 0, 1, 2
QUANT_PER_CHANNEL_ASYM, QUANT_PER_GROUP_SYM, QUANT_PER_GROUP_ASYM = 3, 4, 5
# rknn_core_mask
CORE_AUTO, CORE_0, CORE_1, CORE_2, CORE_0_1, CORE_0_1_2, CORE_ALL = 0, 1, 2, 4, 3, 7, 0xFFFF
# rknn_create_mem2 flags, rknn_mem_sync modes, rknn_tensor_mem.flags
MEMORY_FLAGS_DEFAULT, MEMORY_CACHEABLE, MEMORY_NON_CACHEABLE, MEMORY_TRY_ALLOC_SRAM = 0, 1, 2, 4
MEM_FLAG_ALLOC_NO_CONTEXT = 0x20000
SYNC_TO_DEVICE, SYNC_FROM_DEVICE, SYNC_BIDIRECTIONAL = 1, 2, 3
TENSOR_MEMORY_ALLOC_INSIDE, TENSOR_MEMORY_FROM_FD, TENSOR_MEMORY_FROM_PHYS = 1, 2, 3

MAX_DIMS, MAX_NAME_LEN, MAX_DYNAMIC_SHAPE_NUM = 16, 256, 512
QUERY_SDK_VERSION = 5

# ---------------------------------------------------------------------------------------------------------- errors

SUCC = 0
ERROR_NAMES = {
    -1: "RKNN_ERR_FAIL", -2: "RKNN_ERR_TIMEOUT", -3: "RKNN_ERR_DEVICE_UNAVAILABLE", -4: "RKNN_ERR_MALLOC_FAIL",
    -5: "RKNN_ERR_PARAM_INVALID", -6: "RKNN_ERR_MODEL_INVALID", -7: "RKNN_ERR_CTX_INVALID",
    -8: "RKNN_ERR_INPUT_INVALID", -9: "RKNN_ERR_OUTPUT_INVALID", -10: "RKNN_ERR_DEVICE_UNMATCH",
    -11: "RKNN_ERR_INCOMPATILE_PRE_COMPILE_MODEL", -12: "RKNN_ERR_INCOMPATILE_OPTIMIZATION_LEVEL_VERSION",
    -13: "RKNN_ERR_TARGET_PLATFORM_UNMATCH",
}


class RknnError(RuntimeError):
    """A librknnrt call returned a negative code. `RknnError(code, function)` builds the subclass for the code."""

    code: int = 0

    def __new__(cls, code: int = 0, function: str = "", detail: str = ""):
        if cls is RknnError:
            cls = _ERROR_CLASSES.get(code, RknnError)
        return super().__new__(cls)

    def __init__(self, code: int = 0, function: str = "", detail: str = ""):
        self.code, self.function, self.detail = code, function, detail
        name = ERROR_NAMES.get(code, "unknown error")
        super().__init__(f"{function} failed: {name} ({code})" + (f": {detail}" if detail else ""))

    def __reduce__(self):
        return (RknnError, (self.code, self.function, self.detail))


class RknnFail(RknnError):
    """Generic failure (also: set_core_mask on a single-core chip)."""

    code = -1


class RknnTimeout(RknnError):
    """The NPU did not finish in time."""

    code = -2


class RknnDeviceUnavailable(RknnError):
    """No NPU device."""

    code = -3


class RknnMallocFail(RknnError):
    """Allocation failed (also: rknn_create_mem* returned NULL)."""

    code = -4


class RknnParamInvalid(RknnError):
    """Bad argument: shape, alignment, K limit, type, layout, core mask."""

    code = -5


class RknnModelInvalid(RknnError):
    """Invalid model."""

    code = -6


class RknnCtxInvalid(RknnError):
    """Unknown or destroyed context."""

    code = -7


class RknnInputInvalid(RknnError):
    """Invalid input."""

    code = -8


class RknnOutputInvalid(RknnError):
    """Invalid output."""

    code = -9


class RknnDeviceUnmatch(RknnError):
    """Device mismatch."""

    code = -10


class RknnIncompatiblePrecompileModel(RknnError):
    """Incompatible pre-compiled model."""

    code = -11


class RknnIncompatibleOptimizationLevel(RknnError):
    """Incompatible optimization level."""

    code = -12


class RknnTargetPlatformUnmatch(RknnError):
    """Target platform mismatch."""

    code = -13


_ERROR_CLASSES = {c.code: c for c in RknnError.__subclasses__()}


def check(ret: int, function: str, detail: str = "") -> int:
    """Raise the RknnError subclass for a negative return code, else return it."""
    if ret < 0:
        raise RknnError(ret, function, detail)
    return ret


class RknnLoadError(RuntimeError):
    """librknnrt could not be found or loaded."""


class RknnVersionError(RknnLoadError):
    """librknnrt is an SDK version whose matmul structs this binding does not match."""


# ---------------------------------------------------------------------------------------------------------- structs

# rknn_context: uint64_t, except uint32_t on 32-bit ARM (`__arm__`); follow the pointer size.
rknn_context = c_uint32 if ctypes.sizeof(c_void_p) == 4 else c_uint64


class RknnTensorMem(Structure):
    _fields_ = [("virt_addr", c_void_p), ("phys_addr", c_uint64), ("fd", c_int32), ("offset", c_int32),
                ("size", c_uint32), ("flags", c_uint32), ("priv_data", c_void_p)]


class RknnQuantParams(Structure):
    _fields_ = [("name", c_char * MAX_NAME_LEN), ("scale", POINTER(c_float)), ("scale_len", c_int32),
                ("zp", POINTER(c_int32)), ("zp_len", c_int32)]


class RknnMatmulTensorAttr(Structure):
    _fields_ = [("name", c_char * MAX_NAME_LEN), ("n_dims", c_uint32), ("dims", c_uint32 * MAX_DIMS),
                ("size", c_uint32), ("type", c_int)]


class RknnMatmulIoAttr(Structure):
    _fields_ = [("A", RknnMatmulTensorAttr), ("B", RknnMatmulTensorAttr), ("C", RknnMatmulTensorAttr)]


class RknnMatmulShape(Structure):
    _fields_ = [("M", c_int32), ("K", c_int32), ("N", c_int32)]


class RknnMatmulInfo(Structure):
    _fields_ = [("M", c_int32), ("K", c_int32), ("N", c_int32), ("type", c_int),
                ("B_layout", c_int16), ("B_quant_type", c_int16), ("AC_layout", c_int16), ("AC_quant_type", c_int16),
                ("iommu_domain_id", c_int32), ("group_size", c_int16), ("reserved", c_int8 * 34)]


class RknnSdkVersion(Structure):
    _fields_ = [("api_version", c_char * 256), ("drv_version", c_char * 256)]


STRUCT_SIZES = {RknnMatmulInfo: 64, RknnMatmulTensorAttr: 332, RknnMatmulIoAttr: 996, RknnMatmulShape: 12,
                RknnSdkVersion: 512}
if ctypes.sizeof(c_void_p) == 8:  # pointer-holding structs are smaller on 32-bit ARM
    STRUCT_SIZES.update({RknnTensorMem: 40, RknnQuantParams: 288})
for _s, _n in STRUCT_SIZES.items():
    assert ctypes.sizeof(_s) == _n, f"{_s.__name__} is {ctypes.sizeof(_s)} bytes, the 2.1+ header has {_n}"

# ---------------------------------------------------------------------------------------------------------- library

LIB_ENV_VARS = ("RKNN_LIB", "LIBRKNNRT_PATH")
STANDARD_PATHS = ("/usr/lib/librknnrt.so", "/usr/lib64/librknnrt.so", "/usr/local/lib/librknnrt.so",
                  "/usr/lib/aarch64-linux-gnu/librknnrt.so", "/usr/local/lib64/librknnrt.so",
                  "/vendor/lib64/librknnrt.so", "/vendor/lib/librknnrt.so")
MIN_SDK = (2, 0)


def find_library() -> str | None:
    """Path of librknnrt: $RKNN_LIB / $LIBRKNNRT_PATH (file or directory), standard paths, then the loader path."""
    for var in LIB_ENV_VARS:
        p = os.environ.get(var)
        if p:
            p = os.path.join(p, "librknnrt.so") if os.path.isdir(p) else p
            if os.path.exists(p):
                return p
            log.warning("%s=%s does not exist; ignoring it", var, p)
    for p in STANDARD_PATHS:
        if os.path.exists(p):
            return p
    return ctypes.util.find_library("rknnrt")


_VERSION_RE = re.compile(rb"librknnrt version: ?(\d+\.\d+\.\d+[0-9A-Za-z.]*)")


def version_from_file(path: str) -> str | None:
    """The 'librknnrt version: X.Y.Z' string librknnrt embeds (and logs at init), or None."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            hit = _VERSION_RE.search(m)
            return None if hit is None else bytes(hit.group(1)).decode()
    except (OSError, ValueError):
        return None


def parse_version(text: str) -> tuple[int, int, int] | None:
    hit = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return None if hit is None else tuple(int(g) for g in hit.groups())  # type: ignore[return-value]


_CTX_P = POINTER(rknn_context)
_MEM_P = POINTER(RknnTensorMem)
# name: (restype, argtypes, required)
_SIGNATURES = {
    "rknn_matmul_create": (c_int, [_CTX_P, POINTER(RknnMatmulInfo), POINTER(RknnMatmulIoAttr)], True),
    "rknn_matmul_create_dynamic_shape": (c_int, [_CTX_P, POINTER(RknnMatmulInfo), c_int, POINTER(RknnMatmulShape),
                                                 POINTER(RknnMatmulIoAttr)], False),
    "rknn_matmul_set_dynamic_shape": (c_int, [rknn_context, POINTER(RknnMatmulShape)], False),
    "rknn_matmul_set_io_mem": (c_int, [rknn_context, _MEM_P, POINTER(RknnMatmulTensorAttr)], True),
    "rknn_matmul_set_core_mask": (c_int, [rknn_context, c_int], True),
    "rknn_matmul_set_quant_params": (c_int, [rknn_context, POINTER(RknnQuantParams)], True),
    "rknn_matmul_get_quant_params": (c_int, [rknn_context, POINTER(RknnQuantParams), POINTER(c_float)], False),
    "rknn_matmul_run": (c_int, [rknn_context], True),
    "rknn_matmul_destroy": (c_int, [rknn_context], True),
    "rknn_B_normal_layout_to_native_layout": (c_int, [c_void_p, c_void_p, c_int, c_int, POINTER(RknnMatmulInfo)],
                                              False),
    "rknn_create_mem": (_MEM_P, [rknn_context, c_uint32], True),
    "rknn_create_mem2": (_MEM_P, [rknn_context, c_uint64, c_uint64], False),
    "rknn_create_mem_from_fd": (_MEM_P, [rknn_context, c_int32, c_void_p, c_uint32, c_int32], False),
    "rknn_destroy_mem": (c_int, [rknn_context, _MEM_P], True),
    "rknn_mem_sync": (c_int, [rknn_context, _MEM_P, c_int], False),
    "rknn_query": (c_int, [rknn_context, c_int, c_void_p, c_uint32], False),
}


class RknnLib:
    """A loaded librknnrt with typed functions as attributes (`lib.rknn_matmul_run(ctx)`); optional functions
    missing from the library are None. Refuses libraries older than SDK 2.0 (other struct layouts)."""

    def __init__(self, path: str | None = None):
        path = path or find_library()
        if not path:
            raise RknnLoadError("librknnrt.so not found: set RKNN_LIB (or LIBRKNNRT_PATH) to its path, or install it "
                                f"in one of {', '.join(STANDARD_PATHS[:3])}")
        try:
            self.dll = ctypes.CDLL(path)
        except OSError as e:
            raise RknnLoadError(f"cannot load {path}: {e}") from e
        self.path = path
        for name, (restype, argtypes, _) in _SIGNATURES.items():
            fn = getattr(self.dll, name, None)
            if fn is not None:
                fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        core = ("rknn_matmul_create", "rknn_matmul_run", "rknn_matmul_destroy")
        missing = [n for n in core if getattr(self, n) is None]
        if missing:
            raise RknnLoadError(f"{path} has no {missing[0]}(): not a librknnrt with the matmul API")
        # Version first: a 1.x library also lacks 2.x functions, and the version is the clearer message.
        self.sdk_version, self.driver_version = self._detect_version()
        v = parse_version(self.sdk_version)
        if v is None or v[:2] < MIN_SDK:
            raise RknnVersionError(
                f"{path} is librknnrt {self.sdk_version}: SDK 1.5/1.6 use a 24-byte rknn_matmul_info and other struct "
                "layouts; npulm binds the SDK 2.x API. Install librknnrt 2.1 or newer "
                "(rknn-toolkit2 rknpu2/runtime/Linux/librknn_api/aarch64/librknnrt.so).")
        missing = [n for n, (_, _, required) in _SIGNATURES.items() if required and getattr(self, n) is None]
        if missing:
            raise RknnLoadError(f"{path} (SDK {self.sdk_version}) lacks {', '.join(missing)}")
        if self.rknn_B_normal_layout_to_native_layout is None or self.rknn_matmul_create_dynamic_shape is None:
            log.warning("%s (SDK %s) predates 2.1: no B layout helper / dynamic shapes", path, self.sdk_version)

    def _detect_version(self) -> tuple[str, str]:
        """SDK version: the string embedded in the .so, else rknn_query(SDK_VERSION) on a tiny probe context.
        With neither, a library exporting rknn_matmul_set_quant_params (added in 2.0) is taken as 2.0."""
        v = version_from_file(self.path)
        if v:
            return v, ""
        if self.rknn_query is not None:
            ctx, info, io = rknn_context(0), RknnMatmulInfo(), RknnMatmulIoAttr()
            info.M, info.K, info.N, info.type = 1, 32, 32, FLOAT16_MM_FLOAT16_TO_FLOAT32  # legal on every chip/SDK
            if self.rknn_matmul_create(ctypes.byref(ctx), ctypes.byref(info), ctypes.byref(io)) == SUCC:
                try:
                    sv = RknnSdkVersion()
                    if self.rknn_query(ctx, QUERY_SDK_VERSION, ctypes.byref(sv), ctypes.sizeof(sv)) == SUCC:
                        return sv.api_version.decode(errors="replace"), sv.drv_version.decode(errors="replace")
                finally:
                    self.rknn_matmul_destroy(ctx)
        if self.rknn_matmul_set_quant_params is not None:
            log.warning("%s: SDK version unknown; assuming 2.0 (it has rknn_matmul_set_quant_params)", self.path)
            return "2.0.0 (assumed)", ""
        return "unknown", ""
