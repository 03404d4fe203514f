"""Normal <-> native packing of the matmul API's A, B and C buffers, vectorised (reshape/transpose, no element loops).

Logical arrays are typed numpy arrays: A (M, K), B (K, N), C (M, N); int4 values are int8 arrays in [-8, 7] and
become two per byte only in `to_bytes`. Native layouts (header of SDK 2.x, comment above rknn_matmul_set_io_mem):
  A  (K/sk, M, sk)              A_nat[k1, m, k2] = A[m, k1*sk + k2]
  B  (N/sn, K/sk, sn, sk)       B_nat[n1, k1, n2, k2] = B[k1*sk + k2, n1*sn + n2]; for K above the chip's split size
                                B is stored as consecutive K-segments of that size, each its own native block
  C  (N/sn, M, sn)              C[m, n1*sn + n2] = C_nat[n1, m, n2]
K and N are zero-padded up to the tiles. TP_NORM B is B.T, row-major (N, K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .chips import Chip
from .rknn import ELEMENT_BITS, LAYOUT_NATIVE, LAYOUT_NORM, LAYOUT_TP_NORM, MATMUL_TYPES, TENSOR_TYPE_OF

# numpy storage type per element type (int4: one int8 per value until packed; bf16: raw uint16 bits)
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.uint16, "int32": np.int32, "int16": np.int16,
             "int8": np.int8, "int4": np.int8}


@dataclass(frozen=True)
class NibbleOrder:
    """Which nibble holds the even-index element of each int4 pair ("low" or "high"), per buffer kind.

    Defaults follow Rockchip's matmul demo (unverified on hardware, and inconsistent within the demo): normal layouts
    and native A put the even element in the low nibble; its B normal->native conversion puts it in the high one.
    """

    normal: str = "low"
    a_native: str = "low"
    b_native: str = "high"

    def __post_init__(self) -> None:
        for v in (self.normal, self.a_native, self.b_native):
            if v not in ("low", "high"):
                raise ValueError(f"nibble order must be 'low' or 'high', not {v!r}")

    @classmethod
    def parse(cls, text: str) -> NibbleOrder:
        """"a_native=high", "normal=low,a_native=high,b_native=high" (unnamed kinds keep their default) ->
        NibbleOrder; ValueError naming what is wrong."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in ("normal", "a_native", "b_native"):
                raise ValueError(f"int4 nibble order {text!r}: expected KIND=low|high with KIND normal, a_native or "
                                 "b_native (comma-separated)")
            fields[key.strip()] = value.strip().lower()
        return cls(**fields)

    def text(self) -> str:
        return f"normal={self.normal},a_native={self.a_native},b_native={self.b_native}"

    def for_tensor(self, which: str, layout: int) -> str:
        if layout == LAYOUT_NATIVE:
            return self.a_native if which == "A" else self.b_native
        return self.normal


NIBBLES_ENV = "NPULM_INT4_NIBBLES"  # e.g. "a_native=high": the board's order where it differs from the default


def nibble_setting(profile: str | None = None) -> NibbleOrder:
    """The int4 nibble order npulm packs with: $NPULM_INT4_NIBBLES, else the "nibbles" of the board profile
    (`profile`, or $NPULM_COST_PROFILE; `npulm doctor --profile` writes it when the board differs), else the
    default (Rockchip's demo)."""
    import json
    import os

    env = os.environ.get(NIBBLES_ENV)
    if env:
        return NibbleOrder.parse(env)
    profile = profile or os.environ.get("NPULM_COST_PROFILE")
    if profile and os.path.exists(profile):
        with open(profile) as f:
            nib = json.load(f).get("nibbles")
        if nib:
            try:
                return NibbleOrder(**nib)
            except TypeError:
                raise ValueError(f"{profile}: \"nibbles\" takes normal / a_native / b_native, not {sorted(nib)}") \
                    from None
    return NibbleOrder()


# ----------------------------------------------------------------------------------------------------- int4 nibbles


def pack_int4(values: np.ndarray, order: str = "low") -> np.ndarray:
    """int4 values (any int array in [-8, 7], last axis even) -> uint8 with the last axis halved."""
    v = np.asarray(values)
    if v.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last axis, got {v.shape}")
    even = v[..., 0::2].astype(np.uint8) & 0x0F
    odd = v[..., 1::2].astype(np.uint8) & 0x0F
    return (even | (odd << 4)) if order == "low" else ((even << 4) | odd)


def unpack_int4(packed: np.ndarray, order: str = "low") -> np.ndarray:
    """uint8 -> int8 values in [-8, 7], last axis doubled."""
    p = np.asarray(packed, dtype=np.uint8)
    lo = ((p & 0x0F) ^ 0x08).astype(np.int8) - np.int8(8)  # sign-extend a nibble: (x ^ 8) - 8
    hi = ((p >> 4) ^ 0x08).astype(np.int8) - np.int8(8)
    even, odd = (lo, hi) if order == "low" else (hi, lo)
    return np.stack([even, odd], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)


# ----------------------------------------------------------------------------------------------------- bytes


def nbytes(dtype: str, count: int) -> int:
    return count * ELEMENT_BITS[dtype] // 8


def to_bytes(x: np.ndarray, dtype: str, order: str = "low") -> np.ndarray:
    """A logical array -> its flat uint8 bytes in the element type (int4 packed two per byte in `order`)."""
    if dtype == "int4":
        return pack_int4(np.asarray(x).reshape(-1), order)
    return np.ascontiguousarray(x, dtype=NP_DTYPES[dtype]).reshape(-1).view(np.uint8)


def from_bytes(buf: np.ndarray, dtype: str, count: int, order: str = "low") -> np.ndarray:
    """The first `count` elements of a uint8 buffer as a flat typed array (int4 unpacked to int8 values)."""
    b = np.asarray(buf, dtype=np.uint8).reshape(-1)[: nbytes(dtype, count)]
    if dtype == "int4":
        return unpack_int4(b, order)
    return b.view(NP_DTYPES[dtype])


# ----------------------------------------------------------------------------------------------------- tiles


def _ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    if x.shape == (rows, cols):
        return x
    out = np.zeros((rows, cols), dtype=x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


def rows_to_native(x: np.ndarray, sub: int) -> np.ndarray:
    """A (M, K) or C (M, N) -> the native (cols_p/sub, M, sub): columns zero-padded to a multiple of the tile `sub`
    and cut into tiles, tile-major (sub: the chip's A sub_k, or C sub_n)."""
    m, cols = x.shape
    cols_p = _ceil_to(cols, sub)
    return np.ascontiguousarray(_pad(x, m, cols_p).reshape(m, cols_p // sub, sub).transpose(1, 0, 2))


def rows_from_native(native: np.ndarray, cols: int) -> np.ndarray:
    """(cols_p/sub, M, sub) -> A (M, K) or C (M, N) of `cols` columns, a copy."""
    tiles, m, sub = native.shape
    return native.transpose(1, 0, 2).reshape(m, tiles * sub)[:, :cols].copy()


def k_segments(k: int, split_k: int | None) -> list[tuple[int, int]]:
    """[start, stop) K ranges of B's native segments."""
    if not split_k or k <= split_k:
        return [(0, k)]
    return [(s, min(s + split_k, k)) for s in range(0, k, split_k)]


def b_native_count(k: int, n: int, sub_n: int, sub_k: int, split_k: int | None = None) -> int:
    """Elements in native B, padding included."""
    return _ceil_to(n, sub_n) * sum(_ceil_to(e - s, sub_k) for s, e in k_segments(k, split_k))


def b_to_native(b: np.ndarray, sub_n: int, sub_k: int, split_k: int | None = None) -> np.ndarray:
    """B (K, N) -> flat native B: its K-segments, each (Np/sub_n, Kseg_p/sub_k, sub_n, sub_k), concatenated."""
    k, n = b.shape
    np_ = _ceil_to(n, sub_n)
    parts = []
    for s, e in k_segments(k, split_k):
        kp = _ceil_to(e - s, sub_k)
        seg = _pad(b[s:e], kp, np_).reshape(kp // sub_k, sub_k, np_ // sub_n, sub_n)
        parts.append(seg.transpose(2, 0, 3, 1).reshape(-1))  # (n1, k1, n2, k2)
    return np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])


def b_from_native(flat: np.ndarray, k: int, n: int, sub_n: int, sub_k: int, split_k: int | None = None,
                  out: np.ndarray | None = None) -> np.ndarray:
    """Flat native B -> B (K, N), written into `out` (any dtype the values cast to) when given."""
    np_ = _ceil_to(n, sub_n)
    if out is None:
        out = np.empty((k, n), dtype=flat.dtype)
    pos = 0
    for s, e in k_segments(k, split_k):
        kp = _ceil_to(e - s, sub_k)
        seg = flat[pos: pos + np_ * kp].reshape(np_ // sub_n, kp // sub_k, sub_n, sub_k)
        out[s:e] = seg.transpose(1, 3, 0, 2).reshape(kp, np_)[: e - s, :n]
        pos += np_ * kp
    return out


# ----------------------------------------------------------------------------------------------------- io_attr shapes


@dataclass(frozen=True)
class TensorShape:
    """What rknn_matmul_create reports for one of A, B, C: dims, bytes to allocate, element type."""

    dims: tuple[int, ...]
    size: int
    dtype: str

    @property
    def tensor_type(self) -> int:
        return TENSOR_TYPE_OF[self.dtype]


def io_shapes(chip: Chip, mm_type: int, m: int, k: int, n: int, b_layout: int, ac_layout: int
              ) -> tuple[TensorShape, TensorShape, TensorShape]:
    """The A, B, C dims and sizes for a (validated) matmul on `chip`, as the emulator's io_attr reports them."""
    a_dt, b_dt, c_dt = MATMUL_TYPES[mm_type]
    a_sk, b_sn, b_sk, c_sn = chip.tiles(mm_type)
    if ac_layout == LAYOUT_NATIVE:
        kp = _ceil_to(k, a_sk)
        a = TensorShape((kp // a_sk, m, a_sk), nbytes(a_dt, kp * m), a_dt)
        np_ = _ceil_to(n, c_sn)
        c = TensorShape((np_ // c_sn, m, c_sn), nbytes(c_dt, np_ * m), c_dt)
    else:
        a = TensorShape((m, k), nbytes(a_dt, m * k), a_dt)
        c = TensorShape((m, n), nbytes(c_dt, m * n), c_dt)
    if b_layout == LAYOUT_NATIVE:
        np_, kp = _ceil_to(n, b_sn), _ceil_to(k, b_sk)
        count = b_native_count(k, n, b_sn, b_sk, chip.b_split_k)
        b = TensorShape((np_ // b_sn, kp // b_sk, b_sn, b_sk), nbytes(b_dt, count), b_dt)
    elif b_layout == LAYOUT_TP_NORM:
        b = TensorShape((n, k), nbytes(b_dt, n * k), b_dt)
    else:
        b = TensorShape((k, n), nbytes(b_dt, k * n), b_dt)
    return a, b, c


def layout_name(layout: int) -> str:
    return {LAYOUT_NORM: "normal", LAYOUT_NATIVE: "native", LAYOUT_TP_NORM: "transposed-normal"}.get(layout, "?")
