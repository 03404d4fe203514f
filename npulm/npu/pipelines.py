"""The one table of NPU matmul pipelines: how a weight is quantized once at load, how each call quantizes x, and
which NPU matmul type computes the integer (or fp16) products. Selectable per tensor: "npu:<NAME>" specs,
`--pipeline NAME`, `-ot PATTERN=NAME`.

A pipeline is one `Pipeline` entry in `PIPELINES`. Everything else derives from it: the NPU realization on a chip
(`Pipeline.realize`, run by `npulm.npu.prepared`), the float64 reference (`npulm.npu.simulate`), the emulator checks
(tests/npu/test_pipelines.py walks the table), `npulm doctor`'s verdicts, the CLI's choices and the README / docs
tables (`table_markdown`). Adding a pipeline = one entry here + its tests.

Vocabulary of the fields:
  weights     "fp16"; "tensor-absmax" / "tensor-kl" (one scale per tensor, absmax or KL-calibrated clip);
              "channel-absmax" / "channel-mse" (one scale per output channel). Quantized GGUF weights are
              dequantized and requantized so: the GGUF's own block scales would need one partial sum per 32-input
              block, i.e. K/32 calls or row-expanded A per token (14,040 calls per SmolLM2 token), so no pipeline
              keeps them.
  weight_bits bits of the weight values as stored in NPU memory
  act_bits    bits of x per call, one scale per token row; 16 with int8 weights = x's int8 codes plus the int8
              codes of its residual x - q1 s1, two A rows of the same call (the CPU "a16" path's idea, per row)
  rotation    "none"; "block" = randomized block Hadamard on K, block = the largest power of two dividing K (at most
              512), no padding; "pad" = K zero-padded to the next power of two and one randomized Hadamard
              (rk-llama.cpp's)
  origin      "rk-llama.cpp" (its recipes, the anchors), "npulm", or "" (variants)

Every pipeline makes one NPU call per core per K-chunk, chunks as wide as the chip allows (chip.max_k; for
INT4xINT4 the widest that keeps INT16 partials exact), so a linear costs ceil(K / max_k) x cores calls.
How the CPU and NPU share the work:
  * y = C * scale_x[row] * scale_w[col], C summed over the K-chunks (exact, int64); with 16-bit x the two rows'
    sums are scaled by their own scales and added.
  * 8-bit values on an INT4xINT4-only path are split exactly: v = 16*hi + lo + 8 with hi, lo in [-8, 7]; x halves
    become extra A rows, weight halves extra B columns, and the shift terms are small matmuls on the CPU.
  * INT4xINT4 -> INT16 partials cannot overflow: K-chunks are sized from the weights so that
    max|x code| * sum_k |w code| <= 32767 for every column (`planner.int16_safe_chunk`).

Type defaults (`auto_pipeline`): F32/F16/BF16 -> W16A16; quantized types -> BEST_QUANTIZED. "npu:auto" itself is
the cost model's choice per weight and phase (`npulm.plan.auto_choice`); the type default serves chips without a
cost model and checks that need a pipeline whatever its speed (`npulm doctor`).
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType as Q

from .chips import Chip
from .rknn import (
    FLOAT16_MM_FLOAT16_TO_FLOAT32,
    INT4_MM_INT4_TO_INT16,
    INT8_MM_INT4_TO_INT32,
    INT8_MM_INT8_TO_INT32,
    RknnParamInvalid,
)

MM_NAMES = {FLOAT16_MM_FLOAT16_TO_FLOAT32: "FP16xFP16->FP32", INT8_MM_INT8_TO_INT32: "INT8xINT8->INT32",
            INT4_MM_INT4_TO_INT16: "INT4xINT4->INT16", INT8_MM_INT4_TO_INT32: "INT8xINT4->INT32"}


@dataclass(frozen=True)
class Realization:
    """Which NPU matmul type runs a pipeline, and which 8-bit side is split into two int4 halves."""

    mm_type: int
    a_split: bool = False  # x codes -> 2 int4 passes (extra A rows)
    b_split: bool = False  # weight codes -> 2 int4 halves (extra B columns)
    x_residual: bool = False  # 16-bit x as two int8 rows of the same call: the codes and the int8 residual's codes

    def describe(self) -> str:
        splits = [s for s, on in (("x halves", self.a_split), ("W halves", self.b_split),
                                  ("x + residual rows", self.x_residual)) if on]
        return MM_NAMES[self.mm_type] + (f" ({', '.join(splits)})" if splits else "")

    def short(self) -> str:
        """"INT8xINT8", "2 x INT4xINT4", "INT8xINT8, 2 rows/token", ...: the docs' NPU column."""
        name = MM_NAMES[self.mm_type].split("->")[0]
        if self.x_residual:
            return f"{name}, 2 rows/token"
        return f"{2 ** (self.a_split + self.b_split)} x {name}" if self.a_split or self.b_split else name

    @property
    def rows_per_token(self) -> int:
        """NPU A rows per token row (x halves or residual rows): what a call's M is multiplied by."""
        return 2 if self.a_split or self.x_residual else 1


def realize(chip: Chip, act_bits: int, weight_bits: int) -> Realization:
    """The first realization the chip accepts. INT4xINT4 where it saves something: 4-bit on both sides (one pass),
    or 4-bit weights under 8-bit x (two x passes, but int4 weights: half the NPU memory). 8-bit weights under 4-bit
    x would need weight halves, twice the MACs at twice the rate: no gain, so INT8xINT8 comes first there."""
    R = Realization
    if act_bits == 16 and weight_bits == 16:
        cands = [R(FLOAT16_MM_FLOAT16_TO_FLOAT32)]
    elif act_bits == 16:  # int8 weights under ~16-bit x: x's codes and its residual's codes, two rows of one call
        cands = [R(INT8_MM_INT8_TO_INT32, x_residual=True)]
    elif act_bits <= 4 and weight_bits <= 4:
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


@dataclass(frozen=True)
class Pipeline:
    """One NPU matmul pipeline (the module docstring explains the field values)."""

    name: str
    weights: str
    weight_bits: int
    act_bits: int
    rotation: str
    origin: str
    summary: str  # the docs line
    error_bound: float  # relative error bound against float64 on outlier activations (`npulm doctor`'s verdict)

    def realize(self, chip: Chip, weight_bits: int | None = None) -> Realization:
        """The NPU matmul type on `chip` (weight_bits: of the codes actually stored, when they differ)."""
        return realize(chip, self.act_bits, self.weight_bits if weight_bits is None else weight_bits)

    def activations_text(self) -> str:
        if self.act_bits == 16:
            return "fp16" if self.weights == "fp16" else "int8 + int8 residual per token"
        return f"int{self.act_bits} per token"


PIPELINES: dict[str, Pipeline] = {p.name: p for p in [
    Pipeline("W16A16", "fp16", 16, 16, "none", "rk-llama.cpp",
             "fp16 weights and activations (rows scaled by 2^k), fp32 sums", 1e-3),
    Pipeline("W8A8_STANDARD", "tensor-absmax", 8, 8, "none", "rk-llama.cpp",
             "int8 W with one scale per tensor, int8 x per token (rk-llama.cpp's seed recipe)", 0.08),
    Pipeline("W8A8_CHANNEL", "channel-absmax", 8, 8, "none", "",
             "int8 W per output channel, int8 x per token", 0.08),
    Pipeline("W8A8_HADAMARD", "channel-absmax", 8, 8, "block", "",
             "block Hadamard on K (no padding), int8 W per channel, int8 x per token", 0.03),
    Pipeline("W8A16_CHANNEL", "channel-absmax", 8, 16, "none", "npulm",
             "int8 W per output channel (1 B/param), x as int8 codes plus the int8 codes of its residual (~16-bit) "
             "per token, two rows of one call", 0.012),
    Pipeline("W8A16_HADAMARD", "channel-absmax", 8, 16, "block", "npulm",
             "block Hadamard on K (no padding), int8 W per output channel (1 B/param), x as int8 codes plus the int8 "
             "codes of its residual (~16-bit) per token, two rows of one call", 0.01),
    Pipeline("W4A4_HADAMARD", "tensor-kl", 4, 4, "pad", "rk-llama.cpp",
             "pad-to-2^n Hadamard, int4 W per tensor (KL clip), int4 x per token (rk-llama.cpp)", 0.3),
    Pipeline("W4A4_CHANNEL", "channel-mse", 4, 4, "pad", "",
             "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int4 x per token", 0.25),
    Pipeline("W4A8_CHANNEL", "channel-mse", 4, 8, "pad", "",
             "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int8 x per token", 0.15),
    Pipeline("W4A8_BLOCK", "channel-mse", 4, 8, "block", "npulm",
             "block Hadamard on K (no padding: 0.5 B/param in NPU memory), int4 W per channel (MSE clip), int8 x "
             "per token as two int4 passes", 0.15),
]}

# host work wholly in the C extension (rotation, packing, epilogue; threaded by rows)
C_HOST = ("W16A16", "W8A8_STANDARD", "W8A8_CHANNEL", "W8A8_HADAMARD", "W8A16_CHANNEL", "W8A16_HADAMARD")
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
# The default for quantized GGUF types: the one pipeline within the accuracy bar (ΔPPL +0.1 %, KLD 0.002 against
# the CPU path), and the fastest predicted prefill of the accurate ones (docs/accuracy.md). W8A16_* halve the NPU
# memory and miss the KLD bar (int8 weights per channel: docs/accuracy.md, benchmarks/quant_sim.py --weight-error).
BEST_QUANTIZED = "W16A16"


def pipeline_spec(name: str) -> Pipeline:
    """The table entry of a pipeline name (any case); ValueError naming the known ones otherwise."""
    try:
        return PIPELINES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown NPU pipeline {name!r}; known: {', '.join(PIPELINES)}, auto") from None


def auto_pipeline(qtype: Q, chip: Chip) -> str:
    """The type's default pipeline on a chip, whatever its predicted speed (`resolve("auto")`; placement's
    "npu:auto" asks the cost model first: `npulm.plan.auto_choice`)."""
    return "W16A16" if Q(qtype) in FLOAT_TYPES else BEST_QUANTIZED


def resolve(name: str, qtype: Q, chip: Chip) -> str:
    """The pipeline a tensor of this type actually runs: "auto" resolved, any other name checked."""
    if name.lower() == "auto":
        return auto_pipeline(qtype, chip)
    return pipeline_spec(name).name


def table_markdown(chip: Chip) -> str:
    """The pipeline table as Markdown, with the NPU matmul type on `chip` (the README's and docs' table)."""
    rows = [f"| pipeline | what | NPU op ({chip.name.upper()}) | origin |", "|---|---|---|---|"]
    for p in PIPELINES.values():
        try:
            npu = p.realize(chip).short()
        except RknnParamInvalid:
            npu = "none (runs on the CPU)"
        rows.append(f"| `{p.name}` | {p.summary} | {npu} | {p.origin} |")
    return "\n".join(rows)


if __name__ == "__main__":  # python -m npulm.npu.pipelines [chip]: the README's table
    import sys

    from .chips import get_chip

    print(table_markdown(get_chip(sys.argv[1] if len(sys.argv) > 1 else "rk3588")))
