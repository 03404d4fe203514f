"""The NPU realization of the pipelines in the table (`npulm.npu.pipelines`): a weight quantized once as its
pipeline declares (`npulm.npu.simulate.prepare`), placed on the NPU through the planner, and per call x quantized,
the NPU matmuls run and the partial sums combined with the scales on the CPU. Three shapes cover the table:
`FloatPrepared` (fp16), `RowScaledPrepared` (per-row scales, optional rotation), `GgufPrepared` (the file's codes,
per-group partial sums from row-expanded A). Each equals the pipeline's float64 reference up to float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np

from . import quant as qm
from . import simulate
from .pipelines import Pipeline, pipeline_spec
from .planner import Arena, NpuMatmul, _host, ceil_to, equal_chunks, int16_safe_chunk
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
        self.op = NpuMatmul(arena, b, self.real.mm_type, chunk_k,
                            row_factor=2 if self.real.a_split else 1, name=name)
        self.ops = [self.op]
        c_bytes = 4 if self.real.mm_type != INT4_MM_INT4_TO_INT16 else 2
        self._set_max_m(arena, c_bytes * self.op.n_chunks * self.op.n_pad * self.op.row_factor)

    def _npu(self) -> str:
        return self.real.describe()

    def _call(self, x: np.ndarray) -> np.ndarray:
        m, op, real = x.shape[0], self.op, self.real
        x64 = x.astype(np.float64)
        if self.rotation is not None:
            x64 = qm.rotate_activation(x64, self.rotation)
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


class GgufPrepared(Prepared):
    """The GGUF's own integer codes, block scales/offsets on the CPU, per-group partial sums from row-expanded A.

    Partial-sum groups are the GGUF blocks, or smaller activation groups (act_group=int) nested in them. With the
    "gguf" rotation the codes of each group of h inputs are multiplied by the unnormalized Hadamard H(h) (integers:
    still exact, and checked to fit int8), x by the same H(h); (x H)(H^T q) = h x q, so the 1/h goes with the scales.
    """

    def __init__(self, spec: Pipeline, weight, arena: Arena, name: str, chunk_k: int | None = None):
        pw = simulate.prepare(spec, weight)  # codes (times H(h) for the "gguf" rotation), scales / h, offsets
        n, k = pw.codes.shape
        super().__init__(spec, n, k)
        block = k // pw.scale.shape[1]  # GGUF (sub-)block: one scale each
        self.act_bits, self.block, self.h, codes = spec.act_bits, block, pw.h, pw.codes
        self.act_group = pw.act_group
        self.gs = gs = block if pw.act_group is None else pw.act_group  # inputs per partial sum
        w_bits = 4 if int(codes.min()) >= -8 and int(codes.max()) <= 7 else 8
        self.real = spec.realize(arena.chip, w_bits)
        k_al, _ = arena.chip.padded_align(self.real.mm_type)
        unit = int(np.lcm(k_al, gs))
        want = unit if chunk_k is None else max(unit, chunk_k // unit * unit)
        self.chunk_k = min(want, max(unit, arena.chip.max_k // unit * unit))
        self.c = c = self.chunk_k // gs  # partial groups per chunk = A rows per token and pass
        self.n_chunks = nch = -(-k // self.chunk_k)
        g_pad = nch * c
        self.passes = 2 if self.real.a_split else 1
        sub = arena.chip.tiles(self.real.mm_type)[3]  # C native tile along N
        self.n_half = ceil_to(n, sub)  # weight halves start on a C tile
        if self.real.b_split:
            hi, lo = qm.split_int8_to_int4(codes)
            b = np.zeros((2 * self.n_half, k), np.int8)
            b[:n], b[self.n_half: self.n_half + n] = hi, lo
        else:
            b = codes
        self.op = NpuMatmul(arena, b, self.real.mm_type, self.chunk_k, row_factor=c * self.passes, name=name)
        self.ops = [self.op]
        # epilogue constants: group scales (the rotation's 1/h folded in) and the column sums of the codes
        self.sw_g = np.zeros((g_pad, n), np.float32)
        self.sw_g[: k // gs] = np.repeat(pw.scale, block // gs, axis=1).T
        cols = self.n_half if self.real.b_split else self.op.n_pad
        sw_main = np.zeros((g_pad, cols), np.float32)
        sw_main[:, :n] = self.sw_g
        self.sw_main = sw_main.reshape(1, 1, nch, c, cols)
        colsum = np.zeros((n, g_pad * gs), np.int32)
        colsum[:, :k] = codes
        self.sw_colsum = self.sw_g * colsum.reshape(n, g_pad, gs).sum(axis=2).T
        self.offset = None if pw.offset is None else pw.offset.T.astype(np.float32)  # (blocks, N)
        c_bytes = 4 if self.real.mm_type != INT4_MM_INT4_TO_INT16 else 2
        self._set_max_m(arena, (c_bytes + 8) * nch * self.op.n_pad * self.op.row_factor)

    def _combine(self, out: np.ndarray, xq: np.ndarray, sx: np.ndarray) -> np.ndarray:
        """y from C in its native layout (chunk, N/sub, (pass, token, group), sub).

        With x = 16 hi + lo + 8 (x halves) and W = 16 hi + lo + 8 (weight halves), sum_k x W over a group is
        sum_passes f_pass sum_halves f_half P + 8 R + 8 colsum(W), R = sum_k (x - 8 [x halves]) over the group:
        the integer combination is folded into the scales (f = 16 or 1), the shift terms are two small matmuls.
        One strided copy brings C to (token, group x pass, N); a batched GEMV weights the groups by x's scales."""
        m, c, nch, passes, n = xq.shape[0], self.c, self.n_chunks, self.passes, self.n_out
        a1, sub = out.shape[1], out.shape[3]
        v = out.reshape(nch, a1, passes, m, c, sub)
        # (token, pass, group, N): the group order, hence the float sums, do not depend on the chunking
        q = np.ascontiguousarray(v.transpose(3, 2, 0, 4, 1, 5), dtype=np.float32).reshape(m, passes, nch, c, a1 * sub)
        if self.real.b_split:
            q = 16 * q[..., : self.n_half] + q[..., self.n_half: 2 * self.n_half]
        q *= self.sw_main  # (1, 1, chunk, group, cols): exact partials times exact group scales
        g = nch * c
        sxg = np.zeros((m, g), np.float32)
        sxg[:, : self.n_in // self.gs] = sx  # per group, or (M, 1) per row broadcast
        f = np.array([16.0, 1.0] if passes == 2 else [1.0], np.float32)
        sxp = (f[None, :, None] * sxg[:, None, :]).reshape(m, 1, -1)
        y = np.matmul(sxp, q.reshape(m, passes * g, -1))[:, 0, :n]
        if self.real.b_split:  # 8 * sum_k (x - 8 [x halves]) per group
            r = xq.reshape(m, g, self.gs).sum(axis=2) - (qm.INT8_SPLIT_SHIFT * self.gs if self.real.a_split else 0)
            y += qm.INT8_SPLIT_SHIFT * ((sxg * r) @ self.sw_g)
        if self.real.a_split:  # 8 * colsum(W) per group
            y += qm.INT8_SPLIT_SHIFT * (sxg @ self.sw_colsum)
        return y

    def _npu(self) -> str:
        rot = f", codes x H({self.h})" if self.h > 1 else ""
        return f"{self.real.describe()}, {self.c} group(s) of {self.gs} per chunk{rot}"

    def _call(self, x: np.ndarray) -> np.ndarray:
        m, op, c, gs, nch = x.shape[0], self.op, self.c, self.gs, self.n_chunks
        x64 = x.astype(np.float64)
        xr = qm.rotate_groups(x64, self.h) if self.h > 1 else x64
        xq, sx = qm.quantize_rows(xr, self.act_bits, self.act_group)
        kp = nch * c * gs
        if kp > self.n_in:
            xq = np.pad(xq, ((0, 0), (0, kp - self.n_in)))
        parts = _split_rows(xq).reshape(2, m, kp) if self.real.a_split else xq[None]
        e = np.zeros((nch, self.passes, m, c, c, gs), np.int8)
        ar = np.arange(c)
        for p in range(self.passes):
            e[:, p][:, :, ar, ar, :] = parts[p].reshape(m, nch, c, gs).transpose(1, 0, 2, 3)
        y = self._combine(op.run_native(e.reshape(nch, self.passes * m * c, c * gs), m=m), xq, sx)
        if self.offset is not None:
            y = y + qm.group_sums(x64, self.offset.shape[0]).astype(np.float32) @ self.offset
        return np.ascontiguousarray(y)


def prepare(pipeline: Pipeline | str, weight, arena: Arena, *, gguf_chunk: int | None = None,
            seed: int = 0) -> Prepared:
    """Quantize and place a weight (npulm.linear.Weight, or a float (N, K) array for non-GGUF pipelines) for a
    pipeline (an entry of the table or its name). Raises ValueError for an unknown name, RknnError when the NPU
    refuses."""
    spec = pipeline if isinstance(pipeline, Pipeline) else pipeline_spec(pipeline)
    tensor = getattr(weight, "name", "")
    if spec.weights == "fp16":
        return FloatPrepared(spec, weight, arena, tensor)
    if spec.weights == "gguf":
        return GgufPrepared(spec, weight, arena, tensor, gguf_chunk)
    return RowScaledPrepared(spec, weight, arena, tensor, seed)
