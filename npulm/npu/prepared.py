"""The NPU realization of the pipelines in the table (`npulm.npu.pipelines`): a weight quantized once as its
pipeline declares (`npulm.npu.simulate.prepare`), placed on the NPU through the planner, and per call x quantized,
the NPU matmuls run and the partial sums combined with the scales on the CPU. Two shapes cover the table:
`FloatPrepared` (fp16) and `RowScaledPrepared` (per-row scales, optional rotation; 16-bit x as two int8 rows).
Each makes one NPU call per core per K-chunk and equals the pipeline's float64 reference up to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np

from . import quant as qm
from . import simulate
from .pipelines import Pipeline, pipeline_spec
from .planner import Arena, NpuMatmul, _host, equal_chunks, int16_safe_chunk
from .rknn import INT4_MM_INT4_TO_INT16, INT8_MM_INT8_TO_INT32

SCRATCH_ROW_BYTES = 256 << 20  # cap on one call's C scratch (and host temporaries): bounds the rows per call


def quantize_rows(x64: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | float]:
    """quant.quantize_rows(x, bits) for one scale per row, with the same codes (float64 division, round half to
    even) in fewer numpy calls: codes as float64 integers (cast on the copy into A), scales (M, 1), or a float for
    one row. |x / scale| <= qmax holds by construction, so no clamp is needed."""
    q = float(qm.qmax(bits))
    if x64.shape[0] == 1:
        amax = float(np.abs(x64).max())
        scale = amax / q if amax > 0 else 1.0
        return np.rint(x64 / scale), (amax / q if amax > 0 else 0.0)
    amax = np.abs(x64).max(axis=1, keepdims=True)
    scale = amax / q
    safe = np.where(scale == 0, 1.0, scale)
    return np.rint(x64 / safe), scale


def _split_rows(codes: np.ndarray) -> np.ndarray:
    """int8 codes (R, K) -> (2R, K): the hi halves, then the lo halves (codes = 16*hi + lo + 8)."""
    hi, lo = qm.split_int8_to_int4(codes)
    return np.concatenate([hi, lo], axis=0)


# ----------------------------------------------------------------------------------------------------- prepared


class Prepared:
    """A weight prepared for one pipeline: `self(x)` -> y (M, N) float32. Owns its NPU matmuls (`close()`)."""

    def __init__(self, spec: Pipeline, n_out: int, n_in: int):
        self.spec, self.n_out, self.n_in = spec, n_out, n_in
        self.ops: list[NpuMatmul] = []
        self.max_m = 1

    def _set_max_m(self, arena: Arena, c_bytes_per_row: int) -> None:
        """Rows per NPU call: the largest bucket whose C scratch stays under SCRATCH_ROW_BYTES (at least 1)."""
        ok = [b for b in arena.buckets if b * c_bytes_per_row <= SCRATCH_ROW_BYTES]
        self.max_m = ok[-1] if ok else arena.buckets[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float32)
        if x.ndim != 2 or x.shape[1] != self.n_in:
            raise ValueError(f"x must be (M, {self.n_in}), got {x.shape}")
        m = x.shape[0]
        if m <= self.max_m:
            return self._call(x)
        out = np.empty((m, self.n_out), np.float32)
        for r in range(0, m, self.max_m):
            out[r:r + self.max_m] = self._call(x[r:r + self.max_m])
        return out

    def _call(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        op = self.ops[0]
        return (f"{self.spec.name}: {self._npu()}, K {op.k} in {op.n_chunks} x {op.chunk_k}, "
                f"N {op.n} on {len(op.slices)} core(s), {sum(o.b_bytes for o in self.ops)} B bytes, "
                f"domain {op.domain}")

    def split(self) -> tuple[int, int, int, int]:
        """(cores, K-chunks, NPU runs per call, rows per call): a call of up to max_m rows runs every K-chunk on
        every core slice of every op; more rows repeat that per max_m."""
        op = self.ops[0]
        return len(op.slices), op.n_chunks, sum(o.n_chunks * len(o.slices) for o in self.ops), self.max_m

    def _npu(self) -> str:
        return "FP16xFP16->FP32"

    def close(self) -> None:
        for op in self.ops:
            op.close()
        self.ops = []


def _chunked(a: np.ndarray, n_chunks: int, chunk_k: int) -> np.ndarray:
    """(R, K) -> (n_chunks, R, chunk_k) view (zero-padded copy when K < n_chunks * chunk_k)."""
    r, k = a.shape
    kp = n_chunks * chunk_k
    if k < kp:
        p = np.zeros((r, kp), a.dtype)
        p[:, :k] = a
        a = p
    return a.reshape(r, n_chunks, chunk_k).transpose(1, 0, 2)


class FloatPrepared(Prepared):
    """W16A16: fp16 B; x rows scaled by a power of two (exact) so that fp16 neither overflows nor underflows."""

    def __init__(self, spec: Pipeline, weight, arena: Arena, name: str):
        w = weight if isinstance(weight, np.ndarray) else weight.dequantize()
        super().__init__(spec, *w.shape)
        chip = arena.chip
        t = spec.realize(chip).mm_type  # FP16xFP16->FP32, or RknnParamInvalid where the chip has none
        k_al, _ = chip.padded_align(t)
        chunk_k, _ = equal_chunks(self.n_in, chip.max_k, k_al)
        self.op = NpuMatmul(arena, w, t, chunk_k, name=name)
        self.ops = [self.op]
        self._set_max_m(arena, 4 * self.op.n_chunks * self.op.n_pad)

    def _call(self, x: np.ndarray) -> np.ndarray:
        # rows scaled by a power of two: amax -> [2^13, 2^14), far from fp16's limits, and exact
        if _host is not None:  # the same numbers, packed and reduced in C
            m, op = x.shape[0], self.op
            x = np.ascontiguousarray(x, np.float32)
            s = np.empty(m, np.float32)  # filled by the packing: the power-of-two row scales below
            c, rows = op.run_rows(x, s, 2)
            y = np.empty((m, self.n_out), np.float32)
            _host.unpack_c(c, y, s, s, m, self.n_out, op.n_chunks, op.n_pad, rows, op.c_sub, 0)
            return y
        if x.shape[0] == 1:
            s = np.float32(2.0 ** (math.frexp(float(np.abs(x).max()))[1] - 14))
        else:
            s = np.ldexp(np.float32(1), np.frexp(np.abs(x).max(axis=1, keepdims=True))[1] - 14)
        op = self.op
        c = op.run(_chunked(x / s, op.n_chunks, op.chunk_k), m=x.shape[0])
        y = c[0] if op.n_chunks == 1 else c.sum(axis=0)
        return y * s


class RowScaledPrepared(Prepared):
    """Per-row int activations (after an optional rotation), weights with per-tensor or per-channel scales."""

    def __init__(self, spec: Pipeline, weight, arena: Arena, name: str, seed: int = 0):
        pw = simulate.prepare(spec, weight, seed=seed)
        super().__init__(spec, pw.n_out, pw.n_in)
        self.rotation = pw.rotation
        self.act_bits = spec.act_bits
        self.real = spec.realize(arena.chip)
        codes = pw.codes  # (N, K') int8, K' = rotated/padded K
        self.sw = pw.scale[:, 0][None, :] if pw.scale.shape[0] > 1 else pw.scale[0, 0]
        self.sw_flat = np.ascontiguousarray(pw.scale[:, 0], np.float64)  # for the C epilogue
        b = _split_rows(codes) if self.real.b_split else codes
        self.k_eff = codes.shape[1]
        k_al, _ = arena.chip.padded_align(self.real.mm_type)
        if self.real.mm_type == INT4_MM_INT4_TO_INT16:
            a_max = 8 if self.real.a_split else qm.qmax(self.act_bits)
            chunk_k = int16_safe_chunk(np.abs(b.astype(np.int16)), a_max, k_al, arena.chip.max_k)
        else:
            chunk_k, _ = equal_chunks(self.k_eff, arena.chip.max_k, k_al)
        self.colsum = b.sum(axis=1, dtype=np.int64)  # the a-split shift term, per B column
        self.op = NpuMatmul(arena, b, self.real.mm_type, chunk_k, row_factor=self.real.rows_per_token, name=name)
        self.ops = [self.op]
        c_bytes = 4 if self.real.mm_type != INT4_MM_INT4_TO_INT16 else 2
        self._set_max_m(arena, c_bytes * self.op.n_chunks * self.op.n_pad * self.op.row_factor)

    def _npu(self) -> str:
        return self.real.describe()

    def _rotate(self, x64: np.ndarray) -> np.ndarray:
        """x R (quant.rotate_activation), in C when the extension is there (the same values up to float64
        rounding: a butterfly instead of numpy's Kronecker products)."""
        rot = self.rotation
        if _host is None:
            return qm.rotate_activation(x64, rot)
        out = np.empty((x64.shape[0], rot.k_pad))
        _host.rotate(np.ascontiguousarray(x64), rot.signs, out, x64.shape[0], rot.k, rot.k_pad, rot.block)
        return out

    def _call(self, x: np.ndarray) -> np.ndarray:
        m, op, real = x.shape[0], self.op, self.real
        x64 = x.astype(np.float64)
        if self.rotation is not None:
            x64 = self._rotate(x64)
        if real.x_residual and _host is not None:  # the numpy lines below, in C
            sx = np.empty(2 * m)
            sx[:m] = np.abs(x64).max(axis=1) / qm.qmax(8)  # s1; the residual's s2 are computed by the packing
            c, rows = op.run_rows(np.ascontiguousarray(x64), sx, 3)
            y = np.empty((m, self.n_out), np.float32)
            _host.unpack_c(c, y, sx, self.sw_flat, m, self.n_out, op.n_chunks, op.n_pad, rows, op.c_sub, 2)
            return y
        if real.x_residual:  # rows 0..m-1: x's codes; rows m..2m-1: its residual's codes (one call)
            q1, s1, q2, s2 = qm.quantize_rows_residual(x64)
            c = op.run(_chunked(np.concatenate([q1, q2]), op.n_chunks, op.chunk_k), m=m)
            s = c[0] if op.n_chunks == 1 else c.sum(axis=0, dtype=np.int64)
            return ((s[:m] * s1 + s[m:] * s2) * self.sw).astype(np.float32)
        if _host is not None and real.mm_type == INT8_MM_INT8_TO_INT32 and not (real.a_split or real.b_split):
            sx = np.abs(x64).max(axis=1) / qm.qmax(self.act_bits)  # quantize_rows' scales, packed in C
            c, rows = op.run_rows(np.ascontiguousarray(x64), sx, 1)
            y = np.empty((m, self.n_out), np.float32)
            _host.unpack_c(c, y, sx, self.sw_flat, m, self.n_out, op.n_chunks, op.n_pad, rows, op.c_sub, 1)
            return y
        xq, sx = quantize_rows(x64, self.act_bits)
        a = _split_rows(xq.astype(np.int8)) if real.a_split else xq
        c = op.run(_chunked(a, op.n_chunks, op.chunk_k), m=m)
        s = c[0] if op.n_chunks == 1 else c.sum(axis=0, dtype=np.int64)  # exact
        if real.a_split:
            s = 16 * s[:m].astype(np.int64) + s[m:] + qm.INT8_SPLIT_SHIFT * self.colsum
        if real.b_split:
            n = self.n_out
            s = 16 * s[:, :n].astype(np.int64) + s[:, n:] + qm.INT8_SPLIT_SHIFT * xq.sum(axis=1)[:, None]
        return ((s * sx) * self.sw).astype(np.float32)


def prepare(pipeline: Pipeline | str, weight, arena: Arena, *, seed: int = 0) -> Prepared:
    """Quantize and place a weight (npulm.linear.Weight, or a float (N, K) array) for a pipeline (an entry of the
    table or its name). Raises ValueError for an unknown name, RknnError when the NPU refuses."""
    spec = pipeline if isinstance(pipeline, Pipeline) else pipeline_spec(pipeline)
    tensor = getattr(weight, "name", "")
    if spec.weights == "fp16":
        return FloatPrepared(spec, weight, arena, tensor)
    return RowScaledPrepared(spec, weight, arena, tensor, seed)
