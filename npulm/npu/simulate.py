"""The float64 reference of every pipeline in the table: what it computes, in plain numpy (no runtime calls).

`simulate(pipeline, x, weight)` quantizes the weight as the pipeline's declaration says (`npulm.npu.pipelines`),
quantizes x the same way the NPU path does, and combines integer partial sums with the scales in float64. The NPU
realizations equal it up to float32 rounding (tests/npu/test_pipelines.py), so a pipeline's accuracy can be studied
here without the emulator (benchmarks/quant_sim.py). Nothing here is per pipeline name: the declaration's fields
(weights, weight_bits, act_bits, rotation) decide everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import quant as qm
from .pipelines import Pipeline, pipeline_spec


@dataclass(frozen=True)
class PreparedWeight:
    """A weight quantized once (at load) for a pipeline; `simulate_prepared` runs the per-call part."""

    pipeline: Pipeline
    n_out: int
    n_in: int
    rotation: qm.Rotation | None = None
    codes: np.ndarray | None = None  # int8 (N, K') for integer pipelines
    scale: np.ndarray | None = None  # (1 | N, G) float64
    w16: np.ndarray | None = None  # float16 (N, K) for W16A16


def _as_float(weight) -> np.ndarray:
    if isinstance(weight, np.ndarray):
        return weight.astype(np.float64)
    return weight.dequantize().astype(np.float64)


def _pipeline(pipeline: Pipeline | str) -> Pipeline:
    return pipeline if isinstance(pipeline, Pipeline) else pipeline_spec(pipeline)


def prepare(pipeline: Pipeline | str, weight, seed: int = 0) -> PreparedWeight:
    """Quantize a weight (npulm.linear.Weight, or a float (N, K) array) for a pipeline."""
    p = _pipeline(pipeline)
    w = _as_float(weight)
    n, k = w.shape
    if p.weights == "fp16":
        return PreparedWeight(p, n, k, w16=w.astype(np.float16))
    rot = None
    if p.rotation == "block":
        rot = qm.block_hadamard_rotation(k, seed=seed)
    elif p.rotation == "pad":
        rot = qm.padded_hadamard_rotation(k, seed=seed)
    wr = w if rot is None else qm.rotate_weight(w, rot)
    granularity, clip = p.weights.split("-")
    if granularity == "tensor":
        codes, scale = qm.quantize_per_tensor(wr, p.weight_bits, clip)
    else:
        codes, scale = qm.quantize_per_channel(wr, p.weight_bits, clip)
    return PreparedWeight(p, n, k, rot, codes, scale)


def simulate_prepared(pw: PreparedWeight, x: np.ndarray, literal: bool = False) -> np.ndarray:
    """float64 (M, N) output of the prepared pipeline for float activations x (M, K).

    literal=True computes the exact integer partial sums the pipeline's NPU calls return (two INT4 passes for int8
    activations on int4 weights, as on RK3588) instead of one float64 product: same y to ~1e-15."""
    p = pw.pipeline
    if x.ndim != 2 or x.shape[1] != pw.n_in:
        raise ValueError(f"{p.name}: x must be (M, {pw.n_in}), got {x.shape}")
    if p.weights == "fp16":
        return x.astype(np.float16).astype(np.float64) @ pw.w16.astype(np.float64).T
    x64 = np.asarray(x, np.float64)
    xr = x64 if pw.rotation is None else qm.rotate_activation(x64, pw.rotation)
    if p.act_bits == 16:  # int8 codes plus the int8 codes of the residual: two exact integer products
        q1, s1, q2, s2 = qm.quantize_rows_residual(xr)
        part = qm.block_partials if literal else None
        return (qm.quantized_matmul(q1, s1, pw.codes, pw.scale, partials=part)
                + qm.quantized_matmul(q2, s2, pw.codes, pw.scale, partials=part))
    xq, sx = qm.quantize_rows(xr, p.act_bits)
    partials = None
    if literal:
        partials = qm.split_partials if p.weight_bits == 4 and p.act_bits == 8 else qm.block_partials
    return qm.quantized_matmul(xq, sx, pw.codes, pw.scale, partials=partials)


def simulate(pipeline: Pipeline | str, x: np.ndarray, weight, seed: int = 0, literal: bool = False) -> np.ndarray:
    """float64 reference output y ≈ x @ W.T of a pipeline for float activations x (M, K)."""
    return simulate_prepared(prepare(pipeline, weight, seed), x, literal)
