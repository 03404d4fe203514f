"""The one matmul interface. Every weight matmul of every model is `Linear(x)`: y = x @ W.T.

A Linear is built once at load from a GGUF weight tensor by placement (`npulm.placement`), which parses each
tensor's target ("cpu", "cpu:a8", "cpu:a16", "cpu-ref", "npu:<PIPELINE>", "npu:auto") and builds the backend's
Linear: `npulm.cpu` (C kernels over the GGUF blocks, or float32 BLAS) or `npulm.npu` (an NPU pipeline). Models
never branch on where a matmul runs, and this module knows no backend.
"""

from __future__ import annotations

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
    """y = x @ W.T for x of shape (M, n_in) float32 -> (M, n_out) float32.

    `requested` is the target placement asked for ("cpu", "npu:auto", ...; empty when built directly); `runs_on`
    says where the matmul actually runs ("cpu:a16", "npu:W8A16_HADAMARD", a CPU path after an NPU fallback).
    `row_exact`: an output row is the same bits whatever other rows x holds, for every M (then batching sequences or
    prompt chunks together cannot change any of them)."""

    runs_on = "abstract"
    row_exact = False

    def __init__(self, weight: Weight):
        self.name, self.n_in, self.n_out, self.type = weight.name, weight.n_in, weight.n_out, weight.type
        self.requested = ""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, {self.type.name} {self.n_out}x{self.n_in}, {self.runs_on})"
