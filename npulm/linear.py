"""The one matmul interface. Every weight matmul of every model is `Linear(x)`: y = x @ W.T.

A Linear is built once at load from a GGUF weight tensor and a backend spec chosen per tensor by placement:
  "cpu"          the CPU path (fast quantized kernels where available, else the dequantized reference); "cpu:a8"
                 and "cpu:a16" fix the kernels' activation precision (see npulm.cpu)
  "cpu-ref"      dequantize once to float32 and multiply with BLAS (the reference path)
  "npu:<PIPE>"   an NPU pipeline (W16A16, W8A8_*, W4A4_*, ...) registered by npulm.npu
Models never branch on where a matmul runs; backends register a factory under their spec prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf.constants import GGMLQuantizationType

from .gguf import GGUFError, GGUFFile, dequantize


@dataclass(frozen=True)
class Weight:
    """A 2-D GGUF weight: n_out rows (output channels) of n_in values, stored in the file's own type."""

    name: str
    type: GGMLQuantizationType
    n_out: int
    n_in: int
    data: np.ndarray  # zero-copy: typed (n_out, n_in) for F32/F16, uint8 (n_out, row_bytes) for block types

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, name: str) -> Weight:
        t = gguf.tensor(name)
        if len(t.shape) != 2:
            raise GGUFError(f"{gguf.path}: weight {name!r} has shape {list(t.shape)}, expected 2-D")
        return cls(name, t.type, t.shape[1], t.shape[0], gguf.raw(name))

    @classmethod
    def experts_from_gguf(cls, gguf: GGUFFile, name: str) -> list[Weight]:
        """The experts of a 3-D GGUF tensor (n_expert, n_out, n_in), one Weight each: zero-copy views of the
        file's slices, all named by the tensor (placement matches the GGUF name)."""
        t = gguf.tensor(name)
        if len(t.shape) != 3:
            raise GGUFError(f"{gguf.path}: expert weight {name!r} has shape {list(t.shape)}, expected 3-D")
        data = gguf.raw(name)
        return [cls(name, t.type, t.shape[1], t.shape[0], data[e]) for e in range(t.shape[2])]

    def dequantize(self, rows: np.ndarray | slice | None = None) -> np.ndarray:
        """float32 (n_out, n_in), or only the given rows."""
        data = self.data if rows is None else self.data[rows]
        return dequantize(data, self.type, self.name)


class Linear:
    """y = x @ W.T for x of shape (M, n_in) float32 -> (M, n_out) float32."""

    spec = "abstract"

    def __init__(self, weight: Weight):
        self.name, self.n_in, self.n_out, self.type = weight.name, weight.n_in, weight.n_out, weight.type

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.type.name} {self.n_out}x{self.n_in}, {self.spec})"


class DenseLinear(Linear):
    """Reference CPU path: the weight dequantized once at load to float32, BLAS sgemm per call."""

    spec = "cpu-ref"

    def __init__(self, weight: Weight):
        super().__init__(weight)
        self.w = weight.dequantize()  # (n_out, n_in); x @ w.T lets BLAS read w transposed without a copy

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.w.T


def _cpu_linear(weight: Weight, spec: str) -> Linear:
    from .cpu import make_cpu_linear  # C kernels over GGUF blocks; DenseLinear where a type has none

    return make_cpu_linear(weight, spec)


_BACKENDS: dict[str, Callable[[Weight, str], Linear]] = {
    "cpu-ref": lambda w, spec: DenseLinear(w),
    "cpu": _cpu_linear,
}


def register_backend(prefix: str, factory: Callable[[Weight, str], Linear]) -> None:
    """Make `factory(weight, spec)` build Linears for specs equal to `prefix` or starting with `prefix:`."""
    _BACKENDS[prefix] = factory


def make_linear(weight: Weight, spec: str = "cpu") -> Linear:
    prefix = spec.split(":", 1)[0]
    if prefix == "npu" and prefix not in _BACKENDS:
        from . import npu  # noqa: F401  registers the NPU backend on import
    if prefix not in _BACKENDS:
        raise ValueError(f"unknown matmul backend {spec!r} for {weight.name}; known: {', '.join(_BACKENDS)}")
    return _BACKENDS[prefix](weight, spec)
