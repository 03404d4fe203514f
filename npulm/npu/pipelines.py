"""The one table of NPU matmul pipelines: how a weight is quantized once at load, how each call quantizes x, and
which NPU matmul type computes the integer (or fp16) products. Selectable per tensor: "npu:<NAME>" specs,
`--pipeline NAME`, `-ot PATTERN=NAME`.

A pipeline is one `Pipeline` entry in `PIPELINES`. Everything else derives from it: the NPU realization on a chip
(`Pipeline.realize`, run by `npulm.npu.prepared`), the float64 reference (`npulm.npu.simulate`), the emulator checks
(tests/npu/test_pipelines.py walks the table), `npulm doctor`'s verdicts, the CLI's choices and the README / docs
tables (`table_markdown`). Adding a pipeline = one entry here + its tests.

Vocabulary of the fields:
  weights     "fp16"; "tensor-absmax" / "tensor-kl" (one scale per tensor, absmax or KL-calibrated clip);
              "channel-absmax" / "channel-mse" (one scale per output channel); "gguf" (the file's own integer codes,
              exact, with the GGUF block scales and offsets applied on the CPU)
  weight_bits bits of the weight values as stored in NPU memory (for "gguf": of 4-bit codes; 5-8-bit codes need 8)
  act_bits    bits of x's codes per call; act_group: None = one scale per token row, "block" = per (row, GGUF
              block), n = per (row, n inputs)
  rotation    "none"; "block" = randomized block Hadamard on K, block = the largest power of two dividing K (at most
              512), no padding; "pad" = K zero-padded to the next power of two and one randomized Hadamard
              (rk-llama.cpp's); "gguf" = the GGUF codes of each group of h inputs times the unnormalized Sylvester
              H(h), h the largest power of two <= 16 for which the products still fit int8 (checked on the weight):
              still integers, so still exact; x is rotated by the same H(h) and (x H)(H^T q) = h x q
  origin      "rk-llama.cpp" (its recipes, the anchors), "npulm", or "" (variants)

How the CPU and NPU share the work:
  * per-row pipelines: y = C * scale_x[row] * scale_w[col], C summed over the K-chunks (exact, int64).
  * GGUF pipelines: W[n, k] = d[n, b] * q[n, k] + o[n, b] per GGUF block b (32 inputs; 16 for Q6_K), the integer
    codes q kept exactly. The per-block integer sums P[m, b, n] = sum_{k in b} xq[m, k] q[n, k] come from K-chunks
    of a few blocks each, with A rows expanded so that row (m, b) holds only block b of token m: one matmul per
    chunk gives every block's partial sum. Then y = sum_b sx[m, b] d[n, b] P[m, b, n] + sum_b o[n, b] sum_{k in b}
    x[m, k] (the offset term takes the float x: only the code part is quantized). A per-(row, block) activation
    scale costs nothing more than a per-row one here and matches the CPU path (llama.cpp's int8 activation
    blocks). The price is output volume: K/32 partial sums per output instead of one, and K/chunk calls per core.
    One x scale per row on the same codes costs the same and is far less accurate, so it is not offered.
  * 8-bit values on an INT4xINT4-only path are split exactly: v = 16*hi + lo + 8 with hi, lo in [-8, 7]; x halves
    become extra A rows, weight halves extra B columns, and the shift terms are small matmuls on the CPU.
  * INT4xINT4 -> INT16 partials cannot overflow: K-chunks are sized from the weights so that
    max|x code| * sum_k |w code| <= 32767 for every column (`planner.int16_safe_chunk`); in the GGUF pipelines each
    expanded row touches one block, so |partial| <= 8 * 8 * 32 by construction.

Defaults ("npu:auto", `auto_pipeline`): F32/F16/BF16 -> W16A16; 4-bit GGUF types (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K) ->
BEST_4BIT; other types with exact codes (Q5_x, Q6_K, Q8_0, IQ4_*) -> BEST_W8A8; any other type -> W8A8_HADAMARD.
A chip without INT4 (RK3566/68, RK3562) runs the 4-bit GGUF types with BEST_W8A8.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf.constants import GGMLQuantizationType as Q

from .chips import Chip
from .quant import GGUF_EXACT_TYPES
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

    def describe(self) -> str:
        splits = [s for s, on in (("x halves", self.a_split), ("W halves", self.b_split)) if on]
        return MM_NAMES[self.mm_type] + (f" ({', '.join(splits)})" if splits else "")

    def short(self) -> str:
        """"INT8xINT8", "2 x INT4xINT4", ...: the docs' NPU column."""
        name = MM_NAMES[self.mm_type].split("->")[0]
        return f"{2 ** (self.a_split + self.b_split)} x {name}" if self.a_split or self.b_split else name


def realize(chip: Chip, act_bits: int, weight_bits: int) -> Realization:
    """The first realization the chip accepts. INT4xINT4 where it saves something: 4-bit on both sides (one pass),
    or 4-bit weights under 8-bit x (two x passes, but int4 weights: half the NPU memory). 8-bit weights under 4-bit
    x would need weight halves, twice the MACs at twice the rate: no gain, so INT8xINT8 comes first there."""
    R = Realization
    if act_bits == 16:
        cands = [R(FLOAT16_MM_FLOAT16_TO_FLOAT32)]
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
    act_group: str | int | None
    rotation: str
    origin: str
    summary: str  # the docs line
    error_bound: float  # relative error bound against float64 on outlier activations (`npulm doctor`'s verdict)

    def realize(self, chip: Chip, weight_bits: int | None = None) -> Realization:
        """The NPU matmul type on `chip` (weight_bits: of the codes actually stored, when they differ)."""
        return realize(chip, self.act_bits, self.weight_bits if weight_bits is None else weight_bits)

    def activations_text(self) -> str:
        if self.act_bits == 16:
            return "fp16"
        group = {None: "token", "block": "(token, block)"}.get(self.act_group, f"(token, {self.act_group} inputs)")
        return f"int{self.act_bits} per {group}"


PIPELINES: dict[str, Pipeline] = {p.name: p for p in [
    Pipeline("W16A16", "fp16", 16, 16, None, "none", "rk-llama.cpp",
             "fp16 weights and activations (rows scaled by 2^k), fp32 sums", 1e-3),
    Pipeline("W8A8_STANDARD", "tensor-absmax", 8, 8, None, "none", "rk-llama.cpp",
             "int8 W with one scale per tensor, int8 x per token (rk-llama.cpp's seed recipe)", 0.08),
    Pipeline("W8A8_CHANNEL", "channel-absmax", 8, 8, None, "none", "",
             "int8 W per output channel, int8 x per token", 0.08),
    Pipeline("W8A8_HADAMARD", "channel-absmax", 8, 8, None, "block", "",
             "block Hadamard on K (no padding), int8 W per channel, int8 x per token", 0.03),
    Pipeline("W8A8_GGUF_HADAMARD", "gguf", 8, 8, "block", "gguf", "npulm",
             "the GGUF's codes times an integer Hadamard (exact, int8), x rotated the same, int8 per (token, block)",
             0.02),
    Pipeline("W4A4_HADAMARD", "tensor-kl", 4, 4, None, "pad", "rk-llama.cpp",
             "pad-to-2^n Hadamard, int4 W per tensor (KL clip), int4 x per token (rk-llama.cpp)", 0.3),
    Pipeline("W4A4_CHANNEL", "channel-mse", 4, 4, None, "pad", "",
             "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int4 x per token", 0.25),
    Pipeline("W4A8_CHANNEL", "channel-mse", 4, 8, None, "pad", "",
             "pad-to-2^n Hadamard, int4 W per channel (MSE clip), int8 x per token", 0.15),
    Pipeline("W4A8_BLOCK", "channel-mse", 4, 8, None, "block", "npulm",
             "block Hadamard on K (no padding: 0.5 B/param in NPU memory), int4 W per channel (MSE clip), int8 x "
             "per token as two int4 passes", 0.15),
    Pipeline("W4A8_GGUF_BLOCK", "gguf", 4, 8, "block", "none", "npulm",
             "the GGUF's codes exactly, int8 x per (token, block), block scales on the CPU", 0.02),
    Pipeline("W4A4_GGUF_BLOCK", "gguf", 4, 4, "block", "none", "npulm",
             "the GGUF's codes exactly, int4 x per (token, block), block scales on the CPU", 0.25),
    Pipeline("W4A4_GGUF_HADAMARD", "gguf", 8, 4, 16, "gguf", "npulm",
             "the GGUF's codes times an integer Hadamard (exact, int8), x rotated the same, int4 per "
             "(token, 16 inputs)", 0.12),
]}

C_HOST = ("W16A16", "W8A8_STANDARD", "W8A8_CHANNEL")  # host work wholly in the C extension (threaded by rows)
FLOAT_TYPES = (Q.F32, Q.F16, Q.BF16)
BEST_W8A8 = "W8A8_GGUF_HADAMARD"  # the default for 8-bit-ish GGUF types (Q8_0, Q5_x, Q6_K, ...)
BEST_4BIT = "W4A8_GGUF_BLOCK"  # the default for 4-bit GGUF types on chips with INT4
GGUF_4BIT = (Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q2_K, Q.Q3_K)


def pipeline_spec(name: str) -> Pipeline:
    """The table entry of a pipeline name (any case); ValueError naming the known ones otherwise."""
    try:
        return PIPELINES[name.upper()]
    except KeyError:
        raise ValueError(f"unknown NPU pipeline {name!r}; known: {', '.join(PIPELINES)}, auto") from None


def has_int4(chip: Chip) -> bool:
    return chip.supports(INT4_MM_INT4_TO_INT16) or chip.supports(INT8_MM_INT4_TO_INT32)


def auto_pipeline(qtype: Q, chip: Chip) -> str:
    """The default pipeline for a GGUF tensor type on a chip ("npu:auto")."""
    qtype = Q(qtype)
    if qtype in FLOAT_TYPES:
        return "W16A16"
    if qtype in GGUF_4BIT and has_int4(chip):
        return BEST_4BIT
    if qtype in GGUF_EXACT_TYPES:
        return BEST_W8A8
    return "W8A8_HADAMARD"


def resolve(name: str, qtype: Q, chip: Chip) -> str:
    """The pipeline a tensor of this type actually runs: "auto" resolved; a GGUF pipeline on a type without exact
    integer codes (F16, IQ2_*, ...) takes the type's default instead (its weights cannot be kept as codes)."""
    if name.lower() == "auto":
        return auto_pipeline(qtype, chip)
    spec = pipeline_spec(name)
    if spec.weights == "gguf" and Q(qtype) not in GGUF_EXACT_TYPES:
        return auto_pipeline(qtype, chip)
    return spec.name


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
