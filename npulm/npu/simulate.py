"""The float64 reference of every pipeline in the table: what it computes, in plain numpy (no runtime calls).

`simulate(pipeline, x, weight)` quantizes the weight as the pipeline's declaration says (`npulm.npu.pipelines`),
quantizes x the same way the NPU path does, and combines integer partial sums with the scales in float64. The NPU
realizations equal it up to float32 rounding (tests/npu/test_pipelines.py), so a pipeline's accuracy can be studied
here without the emulator (benchmarks/quant_sim.py). Nothing here is per pipeline name: the declaration's fields
(weights, weight_bits, act_bits, act_group, rotation) decide everything.
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
    offset: np.ndarray | None = None  # (N, G) float64 (GGUF affine types)
    w16: np.ndarray | None = None  # float16 (N, K) for W16A16
    act_group: int | None = None
    h: int = 1  # order of the integer Hadamard on GGUF codes (rotation "gguf")


def _as_float(weight) -> np.ndarray:
    if isinstance(weight, np.ndarray):
        return weight.astype(np.float64)
    return weight.dequantize().astype(np.float64)


def _pipeline(pipeline: Pipeline | str) -> Pipeline:
    return pipeline if isinstance(pipeline, Pipeline) else pipeline_spec(pipeline)


def prepare(pipeline: Pipeline | str, weight, seed: int = 0) -> PreparedWeight:
    """Quantize a weight (npulm.linear.Weight, or a float (N, K) array for non-GGUF pipelines) for a pipeline."""
    p = _pipeline(pipeline)
    if p.weights == "gguf":
        if isinstance(weight, np.ndarray):
            raise ValueError(f"{p.name} needs a GGUF weight (npulm.linear.Weight), not a float array")
        gc = qm.gguf_codes(weight)
        codes, scale, h = gc.codes, gc.scale, 1
        if p.rotation == "gguf":  # codes x H(h): still integers; x is rotated the same and the 1/h joins the scales
            h = qm.integer_hadamard_order(codes, gc.block)
            if h > 1:
                codes, scale = qm.rotate_groups(codes, h).astype(np.int8), scale / h
        group = gc.block if p.act_group == "block" else None if p.act_group is None else min(p.act_group, gc.block)
        return PreparedWeight(p, *codes.shape, None, codes, scale, gc.offset, act_group=group, h=h)
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
    return PreparedWeight(p, n, k, rot, codes, scale, act_group=p.act_group)


def simulate_prepared(pw: PreparedWeight, x: np.ndarray, literal: bool = False) -> np.ndarray:
    """float64 (M, N) output of the prepared pipeline for float activations x (M, K).

    literal=True computes the exact integer partial sums the pipeline's NPU calls return (per group; two INT4 passes
    for int8 activations on int4 GGUF codes, as on RK3588) instead of one float64 product: same y to ~1e-15."""
    p = pw.pipeline
    if x.ndim != 2 or x.shape[1] != pw.n_in:
        raise ValueError(f"{p.name}: x must be (M, {pw.n_in}), got {x.shape}")
    if p.weights == "fp16":
        return x.astype(np.float16).astype(np.float64) @ pw.w16.astype(np.float64).T
    x64 = np.asarray(x, np.float64)
    xr = x64 if pw.rotation is None else qm.rotate_activation(x64, pw.rotation)
    if pw.h > 1:
        xr = qm.rotate_groups(xr, pw.h)
    xq, sx = qm.quantize_rows(xr, p.act_bits, pw.act_group)
    partials = None
    if literal:
        int4_codes = int(pw.codes.min()) >= -8 and int(pw.codes.max()) <= 7
        partials = qm.split_partials if p.weights == "gguf" and p.act_bits == 8 and int4_codes else qm.block_partials
    xs = None if pw.offset is None else qm.group_sums(x64, pw.offset.shape[1])
    return qm.quantized_matmul(xq, sx, pw.codes, pw.scale, pw.offset, xs, partials)


def simulate(pipeline: Pipeline | str, x: np.ndarray, weight, seed: int = 0, literal: bool = False) -> np.ndarray:
    """float64 reference output y ≈ x @ W.T of a pipeline for float activations x (M, K)."""
    return simulate_prepared(prepare(pipeline, weight, seed), x, literal)
