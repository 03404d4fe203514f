"""CPU matmul backend: C kernels that multiply by GGUF weights in place (see npulm/cpu/kernels.c).

`make_cpu_linear` builds the Linear for spec "cpu": a QuantLinear where the type has a kernel, F32Linear (BLAS on
the mmap view) for F32, else the float32 reference DenseLinear. If the C extension was not built, everything takes
the numpy path after one warning.
"""

from __future__ import annotations

import os
import warnings

from gguf.constants import GGMLQuantizationType

from ..linear import DenseLinear, Linear, Weight
from .quant import PATH_AUTO, PATH_GEMM, PATH_ROWS, F32Linear, QuantLinear, RowReader, _kernels

__all__ = ["QuantLinear", "F32Linear", "RowReader", "row_reader", "make_cpu_linear", "available", "isa",
           "set_num_threads", "get_num_threads", "set_spin_us", "PATH_AUTO", "PATH_ROWS", "PATH_GEMM"]

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
    ~210 matmuls of a decode step from paying a wake-up each; lower it when other thread pools need the cores."""
    if _kernels is not None:
        _kernels.set_spin_us(us)


def make_cpu_linear(weight: Weight) -> Linear:
    """The "cpu" Linear: QuantLinear where supported, F32Linear for F32, DenseLinear otherwise."""
    if weight.type == GGMLQuantizationType.F32 and weight.data.ndim == 2:
        return F32Linear(weight)
    if QuantLinear.supports(weight):
        return QuantLinear(weight)
    return DenseLinear(weight)


def row_reader(weight: Weight) -> RowReader | None:
    """Fast float32 rows of a weight (embedding lookups) where a kernel reads its type, else None."""
    return RowReader(weight) if QuantLinear.supports(weight) else None
