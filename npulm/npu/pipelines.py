"""NPU matmul pipelines: how a weight is quantized once at load, and how each call quantizes x, runs the NPU matmuls
and dequantizes. Selectable per tensor: "npu:<NAME>" specs, `--pipeline NAME`, `-ot PATTERN=NAME`.

  name                weights (at load)                   x (per call)            rotation      NPU (RK3588)     origin
  W16A16              fp16                                fp16 (rows scaled 2^k)  none          FP16xFP16->FP32  both
  W8A8_STANDARD       int8, one absmax scale per tensor   int8 per row            none          INT8xINT8->INT32 rkllama
  W8A8_CHANNEL        int8, absmax scale per out channel  int8 per row            none          INT8xINT8->INT32
  W8A8_HADAMARD       int8 per channel, after rotation    int8 per row            block Hadam.  INT8xINT8->INT32
  W8A8_GGUF_HADAMARD  GGUF codes x integer H(h), exact    int8 per (row, block)   H(h) in block INT8xINT8->INT32 npulm
  W4A4_HADAMARD       int4 per tensor, KL-calibrated clip int4 per row            pad to 2^n    INT4xINT4->INT16 rkllama
  W4A4_CHANNEL        int4 per channel, MSE clip          int4 per row            pad to 2^n    INT4xINT4->INT16
  W4A8_CHANNEL        int4 per channel, MSE clip          int8 per row            pad to 2^n    2 x INT4xINT4
  W4A8_GGUF_BLOCK     GGUF codes (exact)                  int8 per (row, block)   none          2 x INT4xINT4    npulm
  W4A4_GGUF_BLOCK     GGUF codes (exact)                  int4 per (row, block)   none          INT4xINT4->INT16*npulm
  W4A4_GGUF_HADAMARD  GGUF codes x integer H(h), exact    int4 per (row, 16)      H(h) in block INT8xINT8->INT32 npulm

(rkllama: rk-llama.cpp's recipes, the anchors. *: for 4-bit codes; 8-bit codes under 4-bit x run on INT8xINT8.)
Block Hadamard: block = the largest power of two dividing K, at most
512, random signs: K is not padded. Pad to 2^n: K zero-padded to the next power of two and one randomized Hadamard
(rk-llama.cpp's rotation). The weight-side quantization and the rotations are `npulm.npu.quant` (`quant.prepare`),
so `quant.simulate(NAME, x, weight)` is the float64 reference of every pipeline with a quant recipe of that name.

Integer products run on the NPU; scales, offsets and sums of partial results are applied on the CPU in float32:
  * per-row pipelines: y = C * scale_x[row] * scale_w[col], C summed over the K-chunks (exact, int64).
  * GGUF pipelines ("the file's codes"): W[n, k] = d[n, b] * q[n, k] + o[n, b] per GGUF block b (32 inputs; 16 for
    Q6_K), the integer codes q kept exactly. The per-block integer sums P[m, b, n] = sum_{k in b} xq[m, k] q[n, k]
    come from K-chunks of a few blocks each, with A rows expanded so that row (m, b) holds only block b of token m:
    one matmul per chunk gives every block's partial sum. Then y = sum_b sx[m, b] d[n, b] P[m, b, n] +
    sum_b o[n, b] sum_{k in b} x[m, k] (the offset term takes the float x: only the code part is quantized).
    A per-(row, block) activation scale costs nothing more than a per-row one here, and matches the CPU path
    (llama.cpp's int8 activation blocks), so W4A8_GGUF_BLOCK tracks the CPU path. The price is output volume: the
    NPU returns K/32 partial sums per output instead of one (more C traffic at prefill), and K/chunk calls per core.
  * integer Hadamard ("GGUF codes x H(h)"): the codes of each group of h inputs are multiplied by the unnormalized
    Sylvester H(h), h the largest power of two <= 16 for which the products still fit int8 (checked on the weight:
    16 for 4-bit codes, 8 for Q5, 4 for Q6_K, 1 for Q8_0): still integers, so still exact. x is rotated by the same
    H(h) and (x H)(H^T q) = h x q: outlier channels are spread over h inputs before x is quantized.
  * 8-bit values on an INT4xINT4-only path are split exactly: v = 16*hi + lo + 8 with hi, lo in [-8, 7]; x halves
    become extra A rows, weight halves extra B columns, and the shift terms (8 * column sums of the weight codes,
    8 * row sums of x's codes) are small matmuls on the CPU. "2 x INT4xINT4" above; INT8xINT8 where INT4 is missing.
  * INT4xINT4 -> INT16 partials cannot overflow: K-chunks are sized from the weights so that
    max|x code| * sum_k |w code| <= 32767 for every column (`planner.int16_safe_chunk`); in the GGUF pipelines each
    expanded row touches one block, so |partial| <= 8 * 8 * 32 by construction.
"W4" in the GGUF names means "the file's codes": Q5_x, Q6_K and Q8_0 codes need int8 (INT8xINT8, or weight halves).
quant's W4A8_GGUF recipe (one x scale per row) is not offered: at the same cost as W4A8_GGUF_BLOCK it measured ten
times the KLD on SmolLM2.

Defaults ("npu:auto", `auto_pipeline`): F32/F16/BF16 -> W16A16; 4-bit GGUF types (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K) ->
BEST_4BIT; other types with exact codes (Q5_x, Q6_K, Q8_0, IQ4_*) -> BEST_W8A8; any other type -> W8A8_HADAMARD.
A chip without INT4 (RK3566/68, RK3562) runs the 4-bit GGUF types with BEST_W8A8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from . import quant as qm
from .planner import Arena, NpuMatmul, _host, ceil_to, equal_chunks, int16_safe_chunk
from .rknn import (
    FLOAT16_MM_FLOAT16_TO_FLOAT32,
    INT4_MM_INT4_TO_INT16,
    INT8_MM_INT4_TO_INT32,
    INT8_MM_INT8_TO_INT32,
    RknnParamInvalid,
)

C_HOST = ("W16A16", "W8A8_STANDARD", "W8A8_CHANNEL")  # host work wholly in the C extension (threaded by rows)
SCRATCH_ROW_BYTES = 256 << 20  # cap on one call's C scratch (and host temporaries): bounds the rows per call


@dataclass(frozen=True)
class PipelineSpec:
    name: str
    weights: str  # "fp16" | "tensor-absmax" | "tensor-kl" | "channel-absmax" | "channel-mse" | "gguf"
    act_bits: int  # 16, 8 or 4
    act_group: str | int | None  # None: one scale per row; "block": per (row, GGUF block); n: per n inputs
    rotation: str  # "none" | "block" | "pad" | "gguf" (integer Hadamard on the codes)
    origin: str  # "rk-llama.cpp" (the anchor recipes), "npulm" or "" (variants)
    summary: str

    @property
    def recipe(self) -> qm.Recipe | None:
        """The quant recipe of the same name (its float64 simulation is this pipeline's reference), if any."""
        return qm.PIPELINES.get(self.name)


PIPELINES: dict[str, PipelineSpec] = {p.name: p for p in [
    PipelineSpec("W16A16", "fp16", 16, None, "none", "rk-llama.cpp", "fp16 weights and activations, fp32 sums"),
    PipelineSpec("W8A8_STANDARD", "tensor-absmax", 8, None, "none", "rk-llama.cpp",
                 "int8 W with one scale per tensor, int8 x per token (rk-llama.cpp's seed recipe)"),
    PipelineSpec("W8A8_CHANNEL", "channel-absmax", 8, None, "none", "", "int8 W per output channel, int8 x per token"),
    PipelineSpec("W8A8_HADAMARD", "channel-absmax", 8, None, "block", "",
                 "block Hadamard on K (no padding), int8 W per channel, int8 x per token"),
    PipelineSpec("W8A8_GGUF_HADAMARD", "gguf", 8, "block", "gguf", "npulm",
                 "the GGUF's codes times an integer Hadamard (exact, int8), x rotated the same, int8 per "
                 "(token, block)"),
    PipelineSpec("W4A4_HADAMARD", "tensor-kl", 4, None, "pad", "rk-llama.cpp",
                 "pad-to-2^n Hadamard, int4 W per tensor (KL clip), int4 x per token (rk-llama.cpp)"),
    PipelineSpec("W4A4_CHANNEL", "channel-mse", 4, None, "pad", "",
                 "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int4 x per token"),
    PipelineSpec("W4A8_CHANNEL", "channel-mse", 8, None, "pad", "",
                 "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int8 x per token as two int4 passes"),
    PipelineSpec("W4A8_BLOCK", "channel-mse", 8, None, "block", "npulm",
                 "block Hadamard on K (no padding: 0.5 B/param in NPU memory), int4 W per channel (MSE clip), int8 x "
                 "per token as two int4 passes"),
    PipelineSpec("W4A8_GGUF_BLOCK", "gguf", 8, "block", "none", "npulm",
                 "the GGUF's codes exactly, int8 x per (token, block) (two int4 passes), block scales on the CPU"),
    PipelineSpec("W4A4_GGUF_BLOCK", "gguf", 4, "block", "none", "npulm",
                 "the GGUF's codes exactly, int4 x per (token, block), block scales on the CPU"),
    PipelineSpec("W4A4_GGUF_HADAMARD", "gguf", 4, 16, "gguf", "npulm",
                 "the GGUF's codes times an integer Hadamard (exact, int8), x rotated the same, int4 per "
                 "(token, 16 inputs)"),
]}

FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BEST_W8A8 = "W8A8_GGUF_HADAMARD"  # the default for 8-bit-ish GGUF types (Q8_0, Q5_x, Q6_K, ...)
BEST_4BIT = "W4A8_GGUF_BLOCK"  # the default for 4-bit GGUF types on chips with INT4
GGUF_4BIT = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q2_K, Q.Q3_K)


def pipeline_spec(name: str) -> PipelineSpec:
    try:
        return PIPELINES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown NPU pipeline {name!r}; known: {', '.join(PIPELINES)}, auto") from None


def has_int4(chip) -> bool:
    return chip.supports(INT4_MM_INT4_TO_INT16) or chip.supports(INT8_MM_INT4_TO_INT32)


def auto_pipeline(qtype: Q, chip) -> str:
    """The default pipeline for a GGUF tensor type on a chip ("npu:auto")."""
    qtype = Q(qtype)
    if qtype in FLOAT_TYPES:
        return "W16A16"
    if qtype in GGUF_4BIT and has_int4(chip):
        return BEST_4BIT
    if qtype in qm.GGUF_EXACT_TYPES:
        return BEST_W8A8
    return "W8A8_HADAMARD"


def resolve(name: str, qtype: Q, chip) -> str:
    """The pipeline a tensor of this type actually runs: "auto" resolved; a GGUF pipeline on a type without exact
    integer codes (F16, IQ2_*, ...) takes the type's default instead (its weights cannot be kept as codes)."""
    if name.lower() == "auto":
        return auto_pipeline(qtype, chip)
    spec = pipeline_spec(name)
    if spec.weights == "gguf" and Q(qtype) not in qm.GGUF_EXACT_TYPES:
        return auto_pipeline(qtype, chip)
    return spec.name


# ----------------------------------------------------------------------------------------------------- realization


@dataclass(frozen=True)
class Realization:
    """Which NPU matmul type runs an integer pipeline, and which 8-bit side is split into two int4 halves."""

    mm_type: int
    a_split: bool = False  # x codes -> 2 int4 passes (extra A rows)
    b_split: bool = False  # weight codes -> 2 int4 halves (extra B columns)

    def describe(self) -> str:
        name = {INT8_MM_INT8_TO_INT32: "INT8xINT8->INT32", INT4_MM_INT4_TO_INT16: "INT4xINT4->INT16",
                INT8_MM_INT4_TO_INT32: "INT8xINT4->INT32"}[self.mm_type]
        splits = [s for s, on in (("x halves", self.a_split), ("W halves", self.b_split)) if on]
        return name + (f" ({', '.join(splits)})" if splits else "")


def realize(chip, act_bits: int, weight_bits: int) -> Realization:
    """The first realization the chip accepts. INT4xINT4 where it saves something: 4-bit on both sides (one pass),
    or 4-bit weights under 8-bit x (two x passes, but int4 weights: half the NPU memory). 8-bit weights under 4-bit
    x would need weight halves, twice the MACs at twice the rate: no gain, so INT8xINT8 comes first there."""
    R = Realization
    if act_bits <= 4 and weight_bits <= 4:
        cands = [R(INT4_MM_INT4_TO_INT16), R(INT8_MM_INT8_TO_INT32)]
    elif weight_bits <= 4:
        cands = [R(INT8_MM_INT4_TO_INT32), R(INT4_MM_INT4_TO_INT16, a_split=True), R(INT8_MM_INT8_TO_INT32)]
    elif act_bits <= 4:
        cands = [R(INT8_MM_INT8_TO_INT32), R(INT4_MM_INT4_TO_INT16, b_split=True)]
    else:
        cands = [R(INT8_MM_INT8_TO_INT32), R(INT4_MM_INT4_TO_INT16, a_split=True, b_split=True)]
    for r in cands:
        if chip.supports(r.mm_type):
            return r
    raise RknnParamInvalid(-5, "rknn_matmul_create", f"{chip.name} accepts none of the matmul types for "
                                                     f"A{act_bits} x W{weight_bits} ({[r.mm_type for r in cands]})")


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

    def __init__(self, spec: PipelineSpec, n_out: int, n_in: int):
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

    def __init__(self, spec: PipelineSpec, weight, arena: Arena, name: str):
        w = weight if isinstance(weight, np.ndarray) else weight.dequantize()
        super().__init__(spec, *w.shape)
        chip = arena.chip
        t = FLOAT16_MM_FLOAT16_TO_FLOAT32
        if not chip.supports(t):
            raise RknnParamInvalid(-5, "rknn_matmul_create", f"FP16xFP16->FP32 is not accepted on {chip.name}")
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

    def __init__(self, spec: PipelineSpec, weight, arena: Arena, name: str, seed: int = 0):
        pw = qm.prepare(spec.name, weight, seed=seed)
        super().__init__(spec, pw.n_out, pw.n_in)
        self.rotation = pw.rotation
        self.act_bits = spec.act_bits
        w_bits = pw.recipe.weight_bits
        self.real = realize(arena.chip, self.act_bits, w_bits)
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


def integer_hadamard_order(codes: np.ndarray, block: int, cap: int = 16) -> int:
    """Largest Hadamard order h (power of two, <= cap, dividing the block) for which the codes rotated by the
    unnormalized Sylvester H(h) within each group of h inputs still fit int8: checked on the weight itself."""
    n, k = codes.shape
    h = 1
    while h * 2 <= min(cap, block):
        r = codes.reshape(n, k // (2 * h), 2 * h).astype(np.int32) @ qm.hadamard(2 * h, normalize=False).astype(
            np.int32)
        if r.min() < -128 or r.max() > 127:
            break
        h *= 2
    return h


def _rotate_groups(a: np.ndarray, h: int) -> np.ndarray:
    """Rows of a times blockdiag(H(h), ...), the unnormalized Sylvester Hadamard, in a's dtype (int32 for ints)."""
    m, k = a.shape
    hm = qm.hadamard(h, normalize=False).astype(np.int32 if a.dtype.kind == "i" else a.dtype)
    return (a.reshape(m, k // h, h) @ hm).reshape(m, k)


class GgufPrepared(Prepared):
    """The GGUF's own integer codes, block scales/offsets on the CPU, per-group partial sums from row-expanded A.

    Partial-sum groups are the GGUF blocks, or smaller activation groups (act_group=int) nested in them. With the
    "gguf" rotation the codes of each group of h inputs are multiplied by the unnormalized Hadamard H(h) (integers:
    still exact, and checked to fit int8), x by the same H(h); (x H)(H^T q) = h x q, so the 1/h goes with the scales.
    """

    def __init__(self, spec: PipelineSpec, weight, arena: Arena, name: str, chunk_k: int | None = None):
        gc = qm.gguf_codes(weight)
        n, k = gc.codes.shape
        super().__init__(spec, n, k)
        self.act_bits, self.block = spec.act_bits, gc.block
        codes = gc.codes
        self.h = 1
        if spec.rotation == "gguf":
            self.h = integer_hadamard_order(codes, gc.block)
            if self.h > 1:
                codes = _rotate_groups(codes, self.h).astype(np.int8)
        if spec.act_group is None:
            self.act_group, gs = None, gc.block
        else:
            gs = gc.block if spec.act_group == "block" else min(int(spec.act_group), gc.block)
            self.act_group = gs
        self.gs = gs  # inputs per partial sum
        w_bits = 4 if int(codes.min()) >= -8 and int(codes.max()) <= 7 else 8
        self.real = realize(arena.chip, self.act_bits, w_bits)
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
        self.sw_g[: k // gs] = np.repeat(gc.scale, gc.block // gs, axis=1).T / self.h
        cols = self.n_half if self.real.b_split else self.op.n_pad
        sw_main = np.zeros((g_pad, cols), np.float32)
        sw_main[:, :n] = self.sw_g
        self.sw_main = sw_main.reshape(1, 1, nch, c, cols)
        colsum = np.zeros((n, g_pad * gs), np.int32)
        colsum[:, :k] = codes
        self.sw_colsum = self.sw_g * colsum.reshape(n, g_pad, gs).sum(axis=2).T
        self.offset = None if gc.offset is None else gc.offset.T.astype(np.float32)  # (blocks, N)
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
        xr = _rotate_groups(x64, self.h) if self.h > 1 else x64
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


def prepare(name: str, weight, arena: Arena, *, gguf_chunk: int | None = None, seed: int = 0) -> Prepared:
    """Quantize and place a weight (npulm.linear.Weight, or a float (N, K) array for non-GGUF pipelines) for the
    named pipeline. Raises ValueError for an unknown name, RknnError when the NPU refuses."""
    spec = pipeline_spec(name)
    tensor = getattr(weight, "name", "")
    if spec.weights == "fp16":
        return FloatPrepared(spec, weight, arena, tensor)
    if spec.weights == "gguf":
        return GgufPrepared(spec, weight, arena, tensor, gguf_chunk)
    return RowScaledPrepared(spec, weight, arena, tensor, seed)


def table_markdown() -> str:
    """The pipeline table as Markdown (for the README and reports)."""
    rows = ["| pipeline | weights | activations | rotation | origin | what |", "|---|---|---|---|---|---|"]
    for p in PIPELINES.values():
        group = {None: "row", "block": "(row, block)"}.get(p.act_group, f"(row, {p.act_group} inputs)")
        act = "fp16" if p.act_bits == 16 else f"int{p.act_bits} per {group}"
        rows.append(f"| {p.name} | {p.weights} | {act} | {p.rotation} | {p.origin} | {p.summary} |")
    return "\n".join(rows)
