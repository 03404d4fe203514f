"""The NPU `Linear`: a weight prepared for one pipeline on a model's `NpuDevice`, and its fallback to the CPU path
when the NPU refuses the weight.

A weight the runtime cannot take (an `RknnError` at load, e.g. a matmul type the chip rejects or memory exhausted,
or at call time) runs on the CPU Linear that placement handed in instead: its output is then exactly the CPU path's.
The device warns once per model, naming the first such tensor and the error.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np

from ..linear import Linear, Weight
from .device import NpuDevice
from .pipelines import pipeline_spec, resolve
from .prepared import Prepared, prepare
from .rknn import RknnError


class NpuLinear(Linear):
    """y = x @ W.T through an NPU pipeline ("auto": the GGUF type's default on the device's chip); the CPU Linear
    from `fallback()` when the NPU refuses the weight, and for calls of fewer than `min_m` token rows (per-phase
    placement: e.g. prefill on the NPU, decode on the CPU, one load)."""

    def __init__(self, weight: Weight, pipeline: str, device: NpuDevice, fallback: Callable[[], Linear],
                 min_m: int = 1):
        super().__init__(weight)
        if pipeline.lower() != "auto":
            pipeline_spec(pipeline)  # unknown names are an error, not a fallback
        self.device = device
        self.pipeline = resolve(pipeline, weight.type, device.chip)
        self.min_m = min_m
        self.refused: str | None = None  # why the NPU refused the weight, if it did
        self._fallback = fallback
        self._cpu: Linear | None = None
        self._cpu_phase: Linear | None = None
        self._impl: Prepared | None = None
        try:
            self._impl = prepare(self.pipeline, weight, device.arena)
        except (RknnError, MemoryError) as e:
            self._fall_back(e)
            return
        # free the NPU contexts and memory when the model (and so this Linear) is dropped
        self._finalizer = weakref.finalize(self, self._impl.close)
        self._lock = device.arena.lock

    def _fall_back(self, error: BaseException) -> None:
        self.device.refused(self.name, error)
        self.refused = f"NPU refused {self.pipeline}: {error}"
        if self._impl is not None:
            self._impl.close()
            self._impl = None
        self._cpu = self._fallback()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._cpu is not None:
            return self._cpu(x)
        if x.shape[0] < self.min_m:  # a phase the NPU is not placed for: the CPU path, exactly
            if self._cpu_phase is None:
                self._cpu_phase = self._fallback()
            return self._cpu_phase(x)
        try:
            with self._lock:
                return self._impl(x)
        except RknnError as e:
            self._fall_back(e)
            return self._cpu(x)

    @property
    def on_npu(self) -> bool:
        return self._cpu is None

    @property
    def runs_on(self) -> str:
        if self._cpu is not None:
            return self._cpu.runs_on
        return f"npu:{self.pipeline}" + (f"@{self.min_m}" if self.min_m > 1 else "")

    def describe(self) -> str:
        return self._impl.describe() if self._impl is not None else f"{self.runs_on} ({self.refused})"

    def split(self) -> tuple[int, int, int, int] | None:
        """(cores, K-chunks, NPU runs per call, rows per call) on the NPU; None after a fallback to the CPU."""
        return self._impl.split() if self._impl is not None else None
