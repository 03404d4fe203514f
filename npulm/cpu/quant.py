"""QuantLinear: y = x @ W.T computed straight from the GGUF blocks (the zero-copy mmap view), no float32 copy.

Where this build has the packed kernel (AVX512-VNNI: every type; NEON dotprod: the types that keep their size, see
nl_pack_default), the weight is also repacked once at load into 16-row panels and every M multiplies those: one int8
dot instruction covers 16 outputs, so a pass of M = 8 rows (a batched decode step, a speculative verify) costs
little more than M = 1, and an output row does not depend on the other rows. A weight not repacked streams its blocks
against int8-quantized activations (the "rows" kernel) at small M; from the gemm threshold on, each call packs
panels on the fly for the same kernel where the build has it. Builds without it keep the
rows kernel for every M: each task re-reads its rows from L2 for every 4 activation rows, and on an AVX2 build it
measured as fast as dequantizing tiles for OpenBLAS at M = 512 (and far steadier when other threads share the
cores). F16 weights, with no integer kernel, go through dequantized tiles + BLAS at large M. Quantizing x per
block of 32 to int8 bounds the error of each output by sum over blocks of amax(|x_block|) / 254 * sum(|w_block|)
(plus float rounding), the same scheme as llama.cpp. With act16 the kernels also multiply the residual x - xq,
rounded the same way, and add the two products: the bound shrinks by ~127x for twice the integer work.

Each call returns a fresh output array: callers keep outputs across calls (a step's logits, a block's q/k/v), which
a buffer reused by the next call would overwrite, and np.empty is a small part of a call's fixed Python cost (large
outputs reuse the freed block). The input is checked by its attributes, not by catching the binding's errors.
"""

from __future__ import annotations

import mmap
import threading
import warnings

import numpy as np
from gguf.constants import GGMLQuantizationType

from ..linear import Linear, Weight

try:
    from . import _kernels
except ImportError:  # reported once by npulm.cpu
    _kernels = None

PATH_AUTO, PATH_ROWS, PATH_GEMM, PATH_PACKED = 0, 1, 2, 3
TILE_BYTES = 4 << 20  # dequantized tile for the BLAS fallback: few dequantize/BLAS alternations
_scratch = threading.local()
_F32 = np.float32
_F32_DTYPE = np.dtype(np.float32)


def _tile_scratch(n: int) -> np.ndarray:
    buf = getattr(_scratch, "buf", None)
    if buf is None or buf.size < n:
        buf = _scratch.buf = np.empty(n, np.float32)
    return buf[:n]


class QuantLinear(Linear):
    """The "cpu" backend: GGUF weights multiplied in place by the C kernels (npulm.cpu._kernels)."""

    @staticmethod
    def supports(weight: Weight) -> bool:
        return _kernels is not None and _kernels.row_bytes(int(weight.type), weight.n_in) > 0

    def __init__(self, weight: Weight, act16: bool = False, pack: bool | None = None):
        super().__init__(weight)
        if not self.supports(weight):
            raise ValueError(f"{weight.name}: no CPU kernel for {weight.type.name} with {weight.n_in} inputs")
        if not weight.data.flags.c_contiguous:
            raise ValueError(f"{weight.name}: weight data must be C-contiguous")
        self.act16 = act16
        self.runs_on = "cpu:a16" if act16 else "cpu:a8"
        if pack is None:  # a module built before the packed kernel has no pack_default
            pack = getattr(_kernels, "pack_default", lambda _: False)(int(weight.type))
        args = (weight.data, int(weight.type), weight.n_out, weight.n_in, act16)
        try:  # the packing arguments only when packing: a module built before them takes five
            self._h = _kernels.weight(*args, True, file_mapped(weight.data)) if pack else _kernels.weight(*args)
        except MemoryError:  # no room for the repacked copy: the GGUF rows as they are, with the rows kernel
            warnings.warn(f"npulm: no memory to repack {weight.name} for the packed CPU kernel; it runs unpacked",
                          RuntimeWarning, stacklevel=2)
            pack, self._h = False, _kernels.weight(*args)
        self.packed = self.row_exact = bool(pack) and _kernels.packed_bytes(self._h) > 0
        # F16 has no integer kernel: large M goes through dequantized tiles + BLAS
        self._tiled = weight.type == GGMLQuantizationType.F16
        self._tile_rows = max(16, TILE_BYTES // (4 * weight.n_in))

    def __call__(self, x: np.ndarray, path: int = PATH_AUTO) -> np.ndarray:
        """x (..., n_in) -> (..., n_out) float32; path forces the rows kernel (1), the gemm (2) or the repacked
        rows (3), for tests."""
        # fast path: what the forward passes, 2-D C-contiguous float32 (anything else goes through _general)
        if (type(x) is np.ndarray and x.dtype is _F32_DTYPE and x.ndim == 2 and x.flags.c_contiguous
                and x.shape[1] == self.n_in):
            m = x.shape[0]
            if not self._tiled or path == PATH_ROWS or (path == PATH_AUTO and m < _kernels.get_gemm_min_m()):
                out = np.empty((m, self.n_out), _F32)
                _kernels.matmul(self._h, x, out, path)
                return out
        return self._general(x, path)

    def _general(self, x: np.ndarray, path: int) -> np.ndarray:
        x = np.ascontiguousarray(x, _F32)
        if x.ndim == 0 or x.shape[-1] != self.n_in:
            raise ValueError(f"{self.name}: x has shape {x.shape}, expected (..., {self.n_in})")
        shape = x.shape
        x = x.reshape(-1, self.n_in)
        out = np.empty((x.shape[0], self.n_out), _F32)
        if self._tiled and path != PATH_ROWS and (path == PATH_GEMM or len(x) >= _kernels.get_gemm_min_m()):
            self._tiled_matmul(x, out)
        else:
            _kernels.matmul(self._h, x, out, path)
        return out.reshape(*shape[:-1], self.n_out)

    def _tiled_matmul(self, x: np.ndarray, out: np.ndarray) -> None:
        rows = self._tile_rows
        buf = _tile_scratch(rows * self.n_in)
        for r0 in range(0, self.n_out, rows):
            r1 = min(self.n_out, r0 + rows)
            tile = buf[: (r1 - r0) * self.n_in].reshape(r1 - r0, self.n_in)
            _kernels.dequantize(self._h, r0, r1, tile)
            out[:, r0:r1] = x @ tile.T


def file_mapped(data: np.ndarray) -> bool:
    """Whether an array lies in a read-only file mapping (a GGUF's tensors): the kernels may then drop its pages
    once a weight is repacked (a later read brings them back from the file), so the repacked copy does not add to
    the file's pages in RSS. Anonymous memory must not be dropped (it would read back as zeros)."""
    base = data
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None) if not isinstance(base, memoryview) else base.obj
    return base is not None and not data.flags.writeable


class RowReader:
    """Rows of a GGUF weight as float32 through the C dequantizer: embedding lookups without gguf.quants' per-call
    overhead."""

    def __init__(self, weight: Weight):
        self.n_rows, self.n_in = weight.n_out, weight.n_in
        self._h = _kernels.weight(weight.data, int(weight.type), weight.n_out, weight.n_in)

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows).reshape(-1)
        out = np.empty((len(rows), self.n_in), _F32)
        for i, r in enumerate(rows.tolist()):
            if not 0 <= r < self.n_rows:
                raise IndexError(f"row {r} out of range for {self.n_rows} rows")
            _kernels.dequantize(self._h, r, r + 1, out[i:i + 1])
        return out


class F32Linear(Linear):
    """F32 GGUF weights: BLAS straight on the zero-copy view (nothing to dequantize)."""

    runs_on = "cpu:f32"

    def __init__(self, weight: Weight):
        super().__init__(weight)
        if weight.type != GGMLQuantizationType.F32:
            raise ValueError(f"{weight.name}: F32Linear needs F32 weights, not {weight.type.name}")
        self._w = weight.data

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, _F32) @ self._w.T


class DenseLinear(Linear):
    """The reference CPU path ("cpu-ref"), and "cpu" for types without a kernel: the weight dequantized once at load
    to float32, BLAS sgemm per call."""

    runs_on = "cpu-ref"

    def __init__(self, weight: Weight):
        super().__init__(weight)
        self.w = weight.dequantize()  # (n_out, n_in); x @ w.T lets BLAS read w transposed without a copy

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w.T
