"""CPU matmul backend: C kernels that multiply by GGUF weights in place (see npulm/cpu/kernels.c).

`make_cpu_linear` builds the Linear for the "cpu" targets: a QuantLinear where the type has a kernel, F32Linear (BLAS
on the mmap view) for F32, else the float32 reference DenseLinear (which is also the "cpu-ref" target). If the C
extension was not built, everything takes the numpy path after one warning.

Activation precision, per tensor:
  "cpu:a8"   activations rounded to int8 per block of 32, as llama.cpp does: fastest, the least accurate;
  "cpu:a16"  the int8 blocks plus their int8-quantized residual (~16-bit): close to the float path's logits, for
             twice the integer work;
  "cpu"      a16 for the matmuls whose input rounding reaches the logits most (ACT16_ROLES), a8 for the rest.
Their perplexity and KL against the float path: the README's "CPU activation precision" (benchmarks/act_precision.py).
"""

from __future__ import annotations

import os
import warnings

from gguf.constants import GGMLQuantizationType

from ..linear import Linear, Weight
from .quant import (
    PATH_AUTO,
    PATH_GEMM,
    PATH_PACKED,
    PATH_ROWS,
    DenseLinear,
    F32Linear,
    QuantLinear,
    RowReader,
    _kernels,
)

__all__ = ["QuantLinear", "F32Linear", "DenseLinear", "RowReader", "row_reader", "make_cpu_linear", "available", "isa",
           "set_num_threads", "get_num_threads", "set_spin_us", "PATH_AUTO", "PATH_ROWS", "PATH_GEMM",
           "PATH_PACKED"]

if _kernels is None:
    warnings.warn("npulm: the C kernels (npulm.cpu._kernels) are not built; CPU matmuls use float32 numpy, "
                  "slower and with a float32 copy of every weight. Reinstall with a C compiler to build them.",
                  RuntimeWarning, stacklevel=2)


def available() -> bool:
    """Whether the C kernels are importable."""
    return _kernels is not None


def isa() -> str:
    """Instruction set the kernels were compiled for ("avx512-vnni", "avx2", "neon-dotprod", "scalar", ...)."""
    return _kernels.isa() if _kernels is not None else "none"


def set_num_threads(n: int | None = None) -> None:
    """Threads for the kernels, like llama.cpp's -t; None or < 1 means os.cpu_count()."""
    if _kernels is not None:
        _kernels.set_num_threads(n if n and n > 0 else os.cpu_count() or 1)


def get_num_threads() -> int:
    return _kernels.get_num_threads() if _kernels is not None else 1


def set_spin_us(us: int) -> None:
    """How long idle kernel threads poll for the next matmul before sleeping (default 500 us). Polling keeps the
    hundreds of matmuls of a decode step from paying a wake-up each; lower it when other thread pools need the cores."""
    if _kernels is not None:
        _kernels.set_spin_us(us)


# Tensor roles that take 16-bit activations under "cpu", by the KL against the float path that each role's int8
# activations add (benchmarks/act_precision.py): attn_v, ffn_up, ffn_down and the output carry most of it in both
# models; ffn_gate lowers the KL a little more but not the perplexity; attn_q/attn_k/attn_output add little for their
# cost.
ACT16_ROLES = ("attn_v", "ffn_up", "ffn_down", "output", "token_embd")
ACTIVATIONS = ("a8", "a16")  # the "cpu:<option>" targets


def tensor_role(name: str) -> str:
    """"blk.3.ffn_down.weight" -> "ffn_down", "token_embd.weight" -> "token_embd"."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name


def make_cpu_linear(weight: Weight, activations: str | None = None) -> Linear:
    """The "cpu" Linear: QuantLinear where supported, F32Linear for F32, DenseLinear otherwise. activations "a8" or
    "a16" fixes the kernels' activation precision; None chooses by the tensor's role (ACT16_ROLES)."""
    if activations not in (None, *ACTIVATIONS):
        raise ValueError(f"unknown CPU activation precision {activations!r} for {weight.name}; known: "
                         f"{', '.join(ACTIVATIONS)}")
    if weight.type == GGMLQuantizationType.F32 and weight.data.ndim == 2:
        return F32Linear(weight)
    if QuantLinear.supports(weight):
        act16 = activations == "a16" or (activations is None and tensor_role(weight.name) in ACT16_ROLES)
        return QuantLinear(weight, act16=act16)
    return DenseLinear(weight)


def row_reader(weight: Weight) -> RowReader | None:
    """Fast float32 rows of a weight (embedding lookups) where a kernel reads its type, else None."""
    return RowReader(weight) if QuantLinear.supports(weight) else None
