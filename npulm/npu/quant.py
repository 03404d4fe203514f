"""Quantization math of the NPU matmul pipelines: pure numpy, no runtime calls.

Everything a pipeline needs besides the NPU itself, as small vectorised functions:
  rotations      Sylvester Hadamard, random signs, block-diagonal / padded Hadamard `Rotation`s, fast WHT, and the
                 integer Hadamard on GGUF codes (`integer_hadamard_order`, `rotate_groups`)
  weights        per-tensor (absmax | KL clip), per-channel (absmax | MSE clip), group-wise -> (int8 codes, scales)
  activations    per-row / per-group symmetric int8 / int4 (round half to even), exact int8 -> two int4 halves
  GGUF codes     the exact integer codes and per-block affine params of a GGUF weight (`gguf_codes`)
  matmul         `quantized_matmul`: integer partial sums (what the NPU computes) scaled and summed in float64

The pipelines that combine them are declared in `npulm.npu.pipelines`; their float64 references are
`npulm.npu.simulate`; their accuracy on real models is in docs/accuracy.md (benchmarks/accuracy.py) and
benchmarks/quant_sim.py.

Conventions. A weight W is (n_out, n_in) = (N, K) and y = x @ W.T. Codes are int8 arrays holding int8 or int4 values.
Scales have shape (1 | N, G) (or (M, G) for activations): G groups of K/G consecutive inputs share one scale, so
per-tensor is (1, 1), per-channel (N, 1), group-wise (N, K/g). A float value is code * scale[group] (+ offset[group]).
Integer products are simulated in float64, which is exact while sums stay below 2**53 (always, here).
GGUF-exact weights cannot be rotated by a real Hadamard (W R leaves the code grid); the per-block partial sums they
need come from K-chunks aligned to the blocks, or from one matmul of the row-expanded activation
(`expand_rows_by_group`); the block scales are applied to the integer partials on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

# --------------------------------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------------------------------


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def largest_pow2_divisor(k: int, cap: int = 512) -> int:
    """Largest power of two dividing k, at most `cap` (64 for K=576, 128 for 640, 512 for 1536)."""
    return min(k & -k, cap)


@lru_cache(maxsize=32)
def _hadamard_cached(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    h.setflags(write=False)
    return h


def hadamard(n: int, normalize: bool = True) -> np.ndarray:
    """Sylvester Hadamard matrix of order n (power of two), float64, symmetric.

    normalize=True divides by sqrt(n) (orthogonal). Integer paths use the ±1 matrix and apply the 1/n of
    (x H)(W H)^T = n x W^T once, outside the integer product."""
    if not is_pow2(n):
        raise ValueError(f"Sylvester Hadamard needs a power-of-two order, got {n}")
    h = _hadamard_cached(n)
    return h / np.sqrt(n) if normalize else h.copy()


def random_signs(n: int, seed: int = 0) -> np.ndarray:
    """n random ±1 (float64) from a seed: the diagonal D of a randomized Hadamard R = D H."""
    return np.where(np.random.default_rng(seed).integers(0, 2, n) == 1, 1.0, -1.0)


def fwht(x: np.ndarray, normalize: bool = True) -> np.ndarray:
    """x @ H(n) along the last axis (n a power of two), in x's float dtype.

    Uses H(p*q) = H(p) kron H(q): x reshaped to (..., p, q) becomes H(p) X H(q), two small BLAS products costing
    (p + q) per element instead of n. It beat dense, block-dense and butterfly products at the sizes of the
    models here, for one row and for 512 (`benchmarks/quant_sim.py --wht` measures them), so it is used for all."""
    n = x.shape[-1]
    if not is_pow2(n):
        raise ValueError(f"fast Walsh-Hadamard transform needs a power-of-two length, got {n}")
    dt = np.dtype(np.float32 if x.dtype == np.float32 else np.float64)
    p = 1 << (n.bit_length() - 1) // 2
    q = n // p
    hp = _hadamard_cached(p).astype(dt, copy=False)
    hq = _hadamard_cached(q).astype(dt, copy=False)
    y = np.asarray(x, dt).reshape(-1, p, q) @ hq
    y = np.matmul(hp, y).reshape(x.shape)
    if normalize:
        y *= dt.type(1.0 / np.sqrt(n))
    return y


@dataclass(frozen=True)
class Rotation:
    """R = D · blockdiag(H(block), ...) on k_pad >= k inputs (inputs k..k_pad-1 are zero padding).

    x -> (pad(x) * signs) @ blockdiag(H): the same map rotates activation rows and weight rows, and
    (x R)(W R)^T = x W^T because R is orthogonal (normalized) or n·I-scaled (unnormalized, `gain` = block)."""

    k: int
    k_pad: int
    block: int
    signs: np.ndarray  # (k_pad,) float64 ±1

    @property
    def gain(self) -> int:
        """(x R)(W R)^T = gain · x W^T when both sides use the unnormalized (±1) Hadamard."""
        return self.block

    def apply(self, x: np.ndarray, normalize: bool = True) -> np.ndarray:
        """Rotate rows of x (..., k) -> (..., k_pad). Keeps float32 input float32 (for speed), else float64."""
        if x.shape[-1] != self.k:
            raise ValueError(f"rotation is for {self.k} inputs, got shape {x.shape}")
        dt = np.float32 if x.dtype == np.float32 else np.float64
        y = np.zeros((*x.shape[:-1], self.k_pad), dt)
        y[..., : self.k] = x
        y *= self.signs.astype(dt)
        lead = y.shape[:-1]
        y = fwht(y.reshape(*lead, self.k_pad // self.block, self.block), normalize)
        return y.reshape(*lead, self.k_pad)

    def matrix(self, normalize: bool = True) -> np.ndarray:
        """Dense (k_pad, k_pad) R for tests; rows k..k_pad-1 act on padding."""
        h = np.kron(np.eye(self.k_pad // self.block), hadamard(self.block, normalize))
        return self.signs[:, None] * h


def block_hadamard_rotation(k: int, block: int | None = None, cap: int = 512, seed: int = 0) -> Rotation:
    """Block-diagonal randomized Hadamard over K, block = largest power of two dividing K (<= cap): no padding."""
    block = largest_pow2_divisor(k, cap) if block is None else block
    if not is_pow2(block) or k % block:
        raise ValueError(f"block {block} must be a power of two dividing K={k}")
    return Rotation(k, k, block, random_signs(k, seed))


def padded_hadamard_rotation(k: int, seed: int = 0) -> Rotation:
    """rk-llama.cpp's rotation: zero-pad K to the next power of two and apply one randomized Hadamard."""
    kp = next_pow2(k)
    return Rotation(k, kp, kp, random_signs(kp, seed))


def rotate_weight(w: np.ndarray, rot: Rotation, normalize: bool = True) -> np.ndarray:
    """W R (rows of W are output channels over K): (N, k) -> (N, k_pad)."""
    return rot.apply(w, normalize)


def rotate_activation(x: np.ndarray, rot: Rotation, normalize: bool = True) -> np.ndarray:
    """x R: (M, k) -> (M, k_pad)."""
    return rot.apply(x, normalize)


# --------------------------------------------------------------------------------------------------------------------
# Symmetric quantizers (shared by weights and activations)
# --------------------------------------------------------------------------------------------------------------------


def qmax(bits: int) -> int:
    """Symmetric clamp: ±127 for int8, ±7 for int4."""
    return (1 << (bits - 1)) - 1


def _grouped(a: np.ndarray, groups: int) -> np.ndarray:
    r, k = a.shape
    if k % groups:
        raise ValueError(f"{groups} groups do not divide {k} columns")
    return a.reshape(r, groups, k // groups)


def quantize_with_scale(a: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """int8 codes = clamp(round_half_even(a / scale), ±qmax); scale (R | 1, G) broadcast over groups of a (R, K).

    A zero scale (all-zero group) gives zero codes."""
    g = scale.shape[1]
    s = np.where(scale == 0, 1.0, scale)[:, :, None]
    q = np.rint(_grouped(np.asarray(a, np.float64), g) / s)
    np.clip(q, -qmax(bits), qmax(bits), out=q)
    return q.astype(np.int8).reshape(a.shape)


def dequantize_codes(codes: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """float64 codes * scale[group] (+ offset[group]) for codes (R, K), scale/offset (R | 1, G)."""
    g = scale.shape[1]
    v = _grouped(codes.astype(np.float64), g) * scale[:, :, None]
    if offset is not None:
        v += offset[:, :, None]
    return v.reshape(codes.shape)


def absmax_scale(a: np.ndarray, bits: int, groups: int = 1) -> np.ndarray:
    """Per-row (per-group) absmax / qmax: shape (R, groups)."""
    return np.abs(_grouped(np.asarray(a, np.float64), groups)).max(axis=2) / qmax(bits)


# --------------------------------------------------------------------------------------------------------------------
# Weight quantizers -> (int8 codes (N, K), float64 scales (1 | N, G))
# --------------------------------------------------------------------------------------------------------------------


def kl_clip(values: np.ndarray, bits: int = 4, bins: int = 2048, steps: int = 128) -> float:
    """Clip threshold minimising KL(P || Q) between the |value| histogram P (clipped into its last bin) and its
    quantization Q to qmax+1 magnitude levels, searched over `steps` thresholds (the entropy calibration rk-llama.cpp
    uses for per-tensor INT4: 2048 bins, 128 steps)."""
    a = np.abs(np.asarray(values, np.float64)).ravel()
    amax = float(a.max()) if a.size else 0.0
    if amax == 0:
        return 0.0
    hist, edges = np.histogram(a, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    levels = qmax(bits) + 1
    best_kl, best_i = np.inf, bins
    for i in range(bins // steps, bins + 1, bins // steps):
        if i < levels:
            continue
        p = hist[:i].copy()
        p[-1] += hist[i:].sum()
        # Q: the unclipped bins merged into `levels` groups, each group's mass spread over its non-empty bins
        grp = np.arange(i) * levels // i
        nz = hist[:i] > 0
        mass = np.bincount(grp, hist[:i], levels)
        count = np.bincount(grp, nz.astype(np.float64), levels)
        q = np.where(nz, mass[grp] / np.maximum(count[grp], 1), 0.0)
        ps, qs = p.sum(), q.sum()
        if qs == 0:
            continue
        p, q = p / ps, q / qs
        m = p > 0
        kl = float(np.sum(p[m] * np.log(p[m] / np.maximum(q[m], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def quantize_per_tensor(w: np.ndarray, bits: int = 8, clip: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """One scale for the whole tensor: clip 'absmax' or 'kl' (entropy-calibrated threshold)."""
    if clip == "absmax":
        t = float(np.abs(w).max())
    elif clip == "kl":
        t = kl_clip(w, bits)
    else:
        raise ValueError(f"per-tensor clip must be 'absmax' or 'kl', got {clip!r}")
    scale = np.full((1, 1), t / qmax(bits))
    return quantize_with_scale(w, scale, bits), scale


def mse_clip_scale(w: np.ndarray, bits: int, groups: int = 1,
                   ratios: np.ndarray | None = None) -> np.ndarray:
    """Per-row (per-group) scale = ratio * absmax / qmax with the ratio (from a grid, then a finer grid around the
    best) minimising the squared quantization error of that row (group). Shape (N, groups)."""
    wg = _grouped(np.asarray(w, np.float64), groups)
    base = np.abs(wg).max(axis=2) / qmax(bits)
    safe = np.where(base == 0, 1.0, base)
    coarse = np.linspace(0.3, 1.0, 15) if ratios is None else np.asarray(ratios, np.float64)

    def search(cands: np.ndarray) -> np.ndarray:  # cands (C, N, G) ratios -> best ratio (N, G)
        err = np.empty(cands.shape)
        for c in range(cands.shape[0]):
            s = (safe * cands[c])[:, :, None]
            err[c] = np.square(np.clip(np.rint(wg / s), -qmax(bits), qmax(bits)) * s - wg).sum(axis=2)
        return np.take_along_axis(cands, err.argmin(axis=0)[None], axis=0)[0]

    best = search(np.broadcast_to(coarse[:, None, None], (len(coarse), *base.shape)))
    if ratios is None:  # refine within ± one coarse step
        step = coarse[1] - coarse[0]
        fine = best[None] + np.linspace(-step, step, 9)[:, None, None]
        best = search(np.clip(fine, 0.05, 1.0))
    return base * best


def quantize_per_channel(w: np.ndarray, bits: int = 8, clip: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """One scale per output channel (row): clip 'absmax' or 'mse' (per-row MSE-optimal clip search)."""
    return quantize_groupwise(w, w.shape[1], bits, clip)


def quantize_groupwise(w: np.ndarray, group: int, bits: int = 4, clip: str = "absmax") -> tuple[np.ndarray, np.ndarray]:
    """One scale per (row, group of `group` consecutive inputs): scales (N, K / group)."""
    groups = w.shape[1] // group
    if clip == "absmax":
        scale = absmax_scale(w, bits, groups)
    elif clip == "mse":
        scale = mse_clip_scale(w, bits, groups)
    else:
        raise ValueError(f"clip must be 'absmax' or 'mse', got {clip!r}")
    return quantize_with_scale(w, scale, bits), scale


# --------------------------------------------------------------------------------------------------------------------
# Activation quantizers
# --------------------------------------------------------------------------------------------------------------------


def quantize_rows(x: np.ndarray, bits: int = 8, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row (per-token) quantization, or per (row, group of `group` inputs): absmax / qmax scale,
    round half to even, clamp ±qmax. Returns int8 codes (M, K) and float64 scales (M, K / group or 1).
    |x - code * scale| <= scale / 2 for every element."""
    groups = 1 if group is None else x.shape[1] // group
    scale = absmax_scale(x, bits, groups)
    return quantize_with_scale(x, scale, bits), scale


def quantize_rows_residual(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """~16-bit x as two int8 rows per token (the NPU's share of the CPU "a16" path): codes q1 with the per-row
    absmax scale s1, then the residual x - q1 * s1 quantized the same way (q2, s2). x ≈ q1 s1 + q2 s2 with
    |error| <= s2 / 2 <= s1 / 508. Returns (q1, s1, q2, s2): int8 (M, K) codes, float64 (M, 1) scales."""
    x = np.asarray(x, np.float64)
    q1, s1 = quantize_rows(x, 8)
    r = x - q1 * s1  # one rounding per element: the C host path computes the same (no fused multiply-add)
    q2, s2 = quantize_rows(r, 8)
    return q1, s1, q2, s2


INT8_SPLIT_SHIFT = 8  # x - 8 = 16*hi + lo covers [-136, 119] ⊇ [-128, 127]; without the shift 120..127 would not fit


def split_int8_to_int4(q: np.ndarray, shift: int = INT8_SPLIT_SHIFT) -> tuple[np.ndarray, np.ndarray]:
    """Exact split of int8 codes into int4 halves: q = 16*hi + lo + shift, hi and lo in [-8, 7].

    lo = ((q - shift + 8) mod 16) - 8, hi = (q - shift - lo) / 16. With shift = 8 every int8 value splits; with
    shift = 0 only [-136, 119] (so 120..127 would need clamping). The shift term of a product,
    shift * sum_k W[n, k], is a per-column constant of the weight codes known at load time."""
    v = q.astype(np.int16) - shift
    if v.min(initial=0) < -136 or v.max(initial=0) > 119:
        raise ValueError(f"codes outside [{-136 + shift}, {119 + shift}] cannot split into int4 halves")
    lo = ((v + 8) & 15) - 8
    hi = (v - lo) >> 4
    return hi.astype(np.int8), lo.astype(np.int8)


def merge_int4_halves(hi: np.ndarray, lo: np.ndarray, shift: int = INT8_SPLIT_SHIFT) -> np.ndarray:
    return (16 * hi.astype(np.int16) + lo + shift).astype(np.int8)


def max_int16_chunk(a_max: int = 8, b_max: int = 8) -> int:
    """Largest K whose INT4xINT4 -> INT16 partial sum cannot overflow: K * a_max * b_max <= 32767 (511 for ±8)."""
    return 32767 // (a_max * b_max)


# --------------------------------------------------------------------------------------------------------------------
# GGUF-native integer codes
# --------------------------------------------------------------------------------------------------------------------

Q = GGMLQuantizationType
_IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


@dataclass(frozen=True)
class GGUFCodes:
    """A GGUF weight as W[n, k] = scale[n, b] * codes[n, k] + offset[n, b], b = k // block.

    The parameters are the exact real numbers the GGUF block format defines (products of fp16 scales and small
    integers, exact in float64; `scale` is also exact in float32), so float32(scale * code + offset) evaluated in
    float64 is bit-for-bit gguf.quants.dequantize. codes are int8 within [code_min, code_max]."""

    type: GGMLQuantizationType
    codes: np.ndarray  # int8 (N, K)
    scale: np.ndarray  # float64 (N, K / block)
    offset: np.ndarray | None  # float64 (N, K / block), None for symmetric types
    block: int
    code_min: int
    code_max: int

    @property
    def bits(self) -> int:
        """Signed integer width the codes need: 4 if they fit INT4 (-8..7), else 8."""
        return 4 if self.code_min >= -8 and self.code_max <= 7 else 8

    def dequantize(self) -> np.ndarray:
        """float32 (N, K): scale*code + offset in float64, rounded once (equal to gguf.quants.dequantize)."""
        return dequantize_codes(self.codes, self.scale, self.offset).astype(np.float32)


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    """float64 of the little-endian fp16 at byte `at` of each block: (..., nbytes) -> (...)."""
    return np.ascontiguousarray(b[..., at:at + 2]).view("<f2")[..., 0].astype(np.float64)


def _nibbles_split(qs: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 2n): the n low nibbles, then the n high nibbles (ggml's 32-element block order)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _bits_le(b: np.ndarray) -> np.ndarray:
    """(..., n) bytes -> (..., 8n) bits, bit j of the little-endian integer first."""
    return np.unpackbits(b, axis=-1, bitorder="little")


def _kquant_scale_min(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins (ggml get_scale_min_k4)."""
    s = s.astype(np.int32)
    lo_sc, lo_m, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([lo_sc & 63, (hi & 15) | ((lo_sc >> 6) << 4)], axis=-1)
    mn = np.concatenate([lo_m & 63, (hi >> 4) | ((lo_m >> 6) << 4)], axis=-1)
    return sc, mn


def _rep(a: np.ndarray, n: int) -> np.ndarray:
    return np.repeat(a, n, axis=-1)


def _decode_blocks(t: GGMLQuantizationType, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """b (R, nblocks, type_size) uint8 -> codes (R, nblocks, block) int16, scale, offset (R, nblocks * subblocks),
    sub-block size."""
    r, nb, _ = b.shape
    if t == Q.Q8_0:
        return b[..., 2:].view(np.int8).astype(np.int16), _f16(b, 0), None, 32
    if t == Q.Q4_0:
        return _nibbles_split(b[..., 2:]).astype(np.int16) - 8, _f16(b, 0), None, 32
    if t == Q.Q4_1:  # d*q + m = d*(q-8) + (m + 8d)
        d, m = _f16(b, 0), _f16(b, 2)
        return _nibbles_split(b[..., 4:]).astype(np.int16) - 8, d, m + 8 * d, 32
    if t in (Q.Q5_0, Q.Q5_1):
        at = 2 if t == Q.Q5_0 else 4
        q = _nibbles_split(b[..., at + 4:]).astype(np.int16) | (_bits_le(b[..., at:at + 4]).astype(np.int16) << 4)
        d = _f16(b, 0)
        return q - 16, d, (None if t == Q.Q5_0 else _f16(b, 2) + 16 * d), 32
    if t == Q.IQ4_NL:
        return _IQ4_VALUES[_nibbles_split(b[..., 2:])].astype(np.int16), _f16(b, 0), None, 32
    if t in (Q.Q4_K, Q.Q5_K):  # d*sc*q - dmin*m per 32-element sub-block
        sc, mn = _kquant_scale_min(b[..., 4:16])
        scale = _f16(b, 0)[..., None] * sc
        lowest = _f16(b, 2)[..., None] * mn
        qs = b[..., -128:].reshape(r, nb, 4, 32)  # chunk c: sub-block 2c low nibbles, 2c+1 high nibbles
        q = np.stack([qs & 15, qs >> 4], axis=3).reshape(r, nb, 8, 32).astype(np.int16)
        mid = 8
        if t == Q.Q5_K:  # fifth bit of sub-block s, element i: bit s of qh[i]
            qh = b[..., 16:48]
            q |= ((qh[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).astype(np.int16) << 4
            mid = 16
        return q.reshape(r, nb, 256) - mid, scale.reshape(r, -1), (mid * scale - lowest).reshape(r, -1), 32
    if t == Q.Q6_K:  # ql[128] qh[64] scales[16] d; element h*128 + 32s + i
        ql = b[..., :128].reshape(r, nb, 2, 64)
        low = np.stack([ql & 15, ql >> 4], axis=3).reshape(r, nb, 2, 4, 32)  # (half, s, i): s<2 low, s>=2 high
        qh = b[..., 128:192].reshape(r, nb, 2, 1, 32)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = (low.astype(np.int16) | (high.astype(np.int16) << 4)).reshape(r, nb, 256) - 32
        scale = _f16(b, 208)[..., None] * b[..., 192:208].view(np.int8)
        return q, scale.reshape(r, -1), None, 16
    if t in (Q.Q2_K, Q.Q3_K):  # 2-bit planes: element 128h + 32s + i from bits 2s of qs[32h + i]
        qs_at = 16 if t == Q.Q2_K else 32
        qs = b[..., qs_at:qs_at + 64].reshape(r, nb, 2, 1, 32)
        q = ((qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3).reshape(r, nb, 256).astype(np.int16)
        if t == Q.Q2_K:  # dl*q - ml = dl*(q-2) + (2 dl - ml)
            s = b[..., :16]
            dl = _f16(b, 80)[..., None] * (s & 15)
            ml = _f16(b, 82)[..., None] * (s >> 4)
            return q - 2, dl.reshape(r, -1), (2 * dl - ml).reshape(r, -1), 16
        # Q3_K: hmask[32] qs[64] scales[12] d; q - 4 unless the hmask bit of element 32s + i (bit s of hmask[i]) is set
        hm = b[..., :32]
        hbit = ((hm[:, :, None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1).reshape(r, nb, 256)
        s = b[..., 96:108].astype(np.int16)
        low4 = np.concatenate([s[..., 0:8] & 15, s[..., 0:8] >> 4], axis=-1)
        high2 = (s[..., 8:12, None] >> (2 * np.arange(4))).transpose(0, 1, 3, 2).reshape(r, nb, 16) & 3
        scale = _f16(b, 108)[..., None] * ((low4 | (high2 << 4)) - 32)
        return q - 4 * (1 - hbit.astype(np.int16)), scale.reshape(r, -1), None, 16
    if t == Q.IQ4_XS:  # d[2] scales_h[2] scales_l[4] qs[128]; sub-block j of 32: scale d*(ls_j - 32)
        sh = b[..., 2:4].copy().view("<u2")[..., 0].astype(np.int32)
        sl = b[..., 4:8].astype(np.int32)
        j = np.arange(8)
        ls = ((sl[..., j // 2] >> (4 * (j % 2))) & 15) | (((sh[..., None] >> (2 * j)) & 3) << 4)
        scale = _f16(b, 0)[..., None] * (ls - 32)
        q = _IQ4_VALUES[_nibbles_split(b[..., 8:].reshape(r, nb, 8, 16))].astype(np.int16)
        return q.reshape(r, nb, 256), scale.reshape(r, -1), None, 32
    raise ValueError(f"no exact integer codes for GGUF type {t.name}")


GGUF_EXACT_TYPES = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
                    Q.IQ4_NL, Q.IQ4_XS)
_CODE_RANGE = {Q.Q4_0: (-8, 7), Q.Q4_1: (-8, 7), Q.Q5_0: (-16, 15), Q.Q5_1: (-16, 15), Q.Q8_0: (-128, 127),
               Q.Q2_K: (-2, 1), Q.Q3_K: (-4, 3), Q.Q4_K: (-8, 7), Q.Q5_K: (-16, 15), Q.Q6_K: (-32, 31),
               Q.IQ4_NL: (-127, 113), Q.IQ4_XS: (-127, 113)}


def gguf_codes_from_raw(data: np.ndarray, qtype: GGMLQuantizationType) -> GGUFCodes:
    """Exact codes of raw GGUF rows: data uint8 (N, row_bytes) as npulm.gguf.GGUFFile.raw returns them."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in _CODE_RANGE:
        raise ValueError(f"no exact integer codes for GGUF type {qtype.name}; "
                         f"supported: {', '.join(t.name for t in GGUF_EXACT_TYPES)}")
    block, size = GGML_QUANT_SIZES[qtype]
    data = np.asarray(data, np.uint8)
    n = data.shape[0]
    if data.ndim != 2 or data.shape[1] % size:
        raise ValueError(f"{qtype.name} rows must be (N, multiple of {size}) bytes, got {data.shape}")
    codes, scale, offset, sub = _decode_blocks(qtype, data.reshape(n, -1, size))
    lo, hi = _CODE_RANGE[qtype]
    return GGUFCodes(qtype, codes.reshape(n, -1).astype(np.int8), scale.reshape(n, -1),
                     None if offset is None else offset.reshape(n, -1), sub, lo, hi)


def gguf_codes(weight) -> GGUFCodes:
    """Exact codes of an npulm.linear.Weight stored in a GGUF block type."""
    return gguf_codes_from_raw(weight.data, weight.type)


# --------------------------------------------------------------------------------------------------------------------
# Quantized matmul: integer partial sums (the NPU's part) combined with scales and offsets (the CPU's part)
# --------------------------------------------------------------------------------------------------------------------


def block_partials(xq: np.ndarray, codes: np.ndarray, groups: int) -> np.ndarray:
    """Exact integer sums P[m, g, n] = sum_{k in group g} xq[m, k] * codes[n, k], as float64 (M, G, N).

    One NPU matmul per K-chunk computes one group. With G > 1 the same sums come from ONE matmul of the row-expanded
    activation `expand_rows_by_group` (M*G rows): at decode (M = 1) that costs little more than a GEMV."""
    m, k = xq.shape
    a = _grouped(xq.astype(np.float64), groups).transpose(1, 0, 2)  # (G, M, k/G)
    b = _grouped(codes.astype(np.float64), groups).transpose(1, 2, 0)  # (G, k/G, N)
    return np.matmul(a, b).transpose(1, 0, 2)


def expand_rows_by_group(xq: np.ndarray, groups: int) -> np.ndarray:
    """(M, K) -> (M*G, K): row m*G + g keeps only group g of row m (zeros elsewhere), so that
    expand_rows_by_group(xq, G) @ codes.T reshaped to (M, G, N) equals block_partials(xq, codes, G)."""
    m, k = xq.shape
    gs = k // groups
    out = np.zeros((m, groups, k), xq.dtype)
    idx = np.arange(k)
    out[:, idx // gs, idx] = xq
    return out.reshape(m * groups, k)


PartialsFn = Callable[[np.ndarray, np.ndarray, int], np.ndarray]
_CHUNK_ELEMENTS = 1 << 22  # bound the (rows, G, N) partials array to 32 MB of float64


def quantized_matmul(xq: np.ndarray, sx: np.ndarray, codes: np.ndarray, sw: np.ndarray,
                     offset: np.ndarray | None = None, xsum: np.ndarray | None = None,
                     partials: PartialsFn | None = None) -> np.ndarray:
    """y[m, n] = sum_g sx[m, g] * sw[n, g] * P[m, g, n] + sum_g offset[n, g] * xsum[m, g], float64 (M, N).

    xq (M, K) and codes (N, K) are integer codes; sx (M, Ga) and sw (1 | N, Gw) their group scales (nested groups:
    the finer count must be a multiple of the coarser). offset (N, Gw) is the weight's per-group offset; xsum (M, Gw)
    the per-group sums of the (float or dequantized) activation that multiply it.

    `partials(xq_rows, codes, G)` computes the exact integer per-group sums P the way a pipeline does (`block_partials`,
    `split_partials` for two INT4 passes, or an NPU call). Without it, one float64 product of the scaled codes gives
    the same y up to float64 rounding (~1e-16 relative) many times faster."""
    ga, gw = sx.shape[1], sw.shape[1]
    g = max(ga, gw)
    if g % ga or g % gw:
        raise ValueError(f"activation groups {ga} and weight groups {gw} are not nested")
    m, n = xq.shape[0], codes.shape[0]
    if partials is None:
        y = dequantize_codes(xq, sx) @ dequantize_codes(codes, np.broadcast_to(sw, (n, gw))).T
    else:
        swe = np.broadcast_to(np.repeat(sw, g // gw, axis=1), (n, g))
        y = np.empty((m, n))
        rows = max(1, _CHUNK_ELEMENTS // (g * n))
        for r in range(0, m, rows):
            p = partials(xq[r:r + rows], codes, g)
            sxe = np.repeat(sx[r:r + rows], g // ga, axis=1)
            y[r:r + rows] = np.einsum("mgn,ng->mn", p * sxe[:, :, None], swe)
    if offset is not None:
        if xsum is None:
            raise ValueError("an offset needs the per-group activation sums")
        y += xsum @ offset.T
    return y


def group_sums(x: np.ndarray, groups: int) -> np.ndarray:
    """(M, K) -> (M, G) float64 sums over each group of K / G inputs (the offset term's activation factor)."""
    return _grouped(np.asarray(x, np.float64), groups).sum(axis=2)


def split_partials(xq: np.ndarray, codes: np.ndarray, groups: int, shift: int = INT8_SPLIT_SHIFT) -> np.ndarray:
    """The int8 x int4 partial sums from two exact INT4 x INT4 passes: 16 * P(hi) + P(lo) + shift * colsum(codes).

    Equal to block_partials(xq, codes, groups) whenever codes fit int4; each pass's per-group sums are what an
    INT4 x INT4 -> INT16 NPU matmul returns (|sum| <= 64 * K/G: no INT16 overflow for groups <= 511 inputs)."""
    hi, lo = split_int8_to_int4(xq, shift)
    colsum = _grouped(codes.astype(np.float64), groups).sum(axis=2)  # (N, G)
    return 16 * block_partials(hi, codes, groups) + block_partials(lo, codes, groups) + shift * colsum.T[None]


def gguf_matmul(x: np.ndarray, gc: GGUFCodes, act_bits: int = 8, act_group: int | None = None,
                split_int4: bool = False, literal: bool = False) -> np.ndarray:
    """float64 simulation of the GGUF-exact matmul: the weight's own codes, per-(row, block) scales applied to the
    integer per-block sums of the quantized x, offsets applied to per-block float sums of x:

        y[m, n] = sum_b sx[m] * s[n, b] * sum_{k in b} xq[m, k] * code[n, k]  +  sum_b o[n, b] * sum_{k in b} x[m, k]

    act_group = None: one activation scale per row; else per (row, act_group inputs) (must nest with the weight's
    blocks). literal: compute the exact integer per-block sums (as the NPU does) instead of one float64 product;
    split_int4: compute them as two INT4 x INT4 passes (codes must fit int4)."""
    k = x.shape[1]
    nb = k // gc.block
    xq, sx = quantize_rows(x, act_bits, act_group)
    if split_int4 and (gc.bits != 4 or act_bits != 8):
        raise ValueError("the int4 split needs int8 activations and int4 weight codes")
    xs = None if gc.offset is None else group_sums(x, nb)
    partials = split_partials if split_int4 else block_partials if literal else None
    return quantized_matmul(xq, sx, gc.codes, gc.scale, gc.offset, xs, partials)


# --------------------------------------------------------------------------------------------------------------------
# Integer Hadamard on GGUF codes
# --------------------------------------------------------------------------------------------------------------------


def integer_hadamard_order(codes: np.ndarray, block: int, cap: int = 16) -> int:
    """Largest Hadamard order h (power of two, <= cap, dividing the block) for which the codes rotated by the
    unnormalized Sylvester H(h) within each group of h inputs still fit int8: checked on the weight itself."""
    n, k = codes.shape
    h = 1
    while h * 2 <= min(cap, block):
        r = codes.reshape(n, k // (2 * h), 2 * h).astype(np.int32) @ hadamard(2 * h, normalize=False).astype(np.int32)
        if r.min() < -128 or r.max() > 127:
            break
        h *= 2
    return h


def rotate_groups(a: np.ndarray, h: int) -> np.ndarray:
    """Rows of a times blockdiag(H(h), ...), the unnormalized Sylvester Hadamard, in a's dtype (int32 for ints)."""
    m, k = a.shape
    hm = hadamard(h, normalize=False).astype(np.int32 if a.dtype.kind == "i" else a.dtype)
    return (a.reshape(m, k // h, h) @ hm).reshape(m, k)


def relative_error(y: np.ndarray, ref: np.ndarray) -> float:
    """||y - ref||_F / ||ref||_F."""
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
