"""The NPU `Linear` ("npu:<PIPELINE>" / "npu:auto" specs), the process-wide NPU configuration (chip, runtime,
shared arena), and the fallback to the CPU path when the NPU refuses a weight.

A weight the runtime cannot take (an `RknnError` at load, e.g. a matmul type the chip rejects or memory exhausted,
or at call time) runs on the CPU Linear (`make_linear(weight, "cpu")`) instead: its output is then exactly the
CPU path's. One warning per configured model names the first such tensor and the error.
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np

from ..linear import Linear, Weight, make_linear
from . import owner
from .chips import Chip, chip_from_env_or_board, get_chip
from .device import open_runtime
from .pipelines import auto_pipeline, pipeline_spec, resolve
from .planner import Arena
from .prepared import Prepared, prepare
from .rknn import RknnError
from .runtime import Runtime

log = logging.getLogger("npulm.npu")


class NpuFallbackWarning(RuntimeWarning):
    """A weight placed on the NPU runs on the CPU instead."""


@dataclass
class _State:
    runtime: Runtime | None = None
    arena: Arena | None = None
    gguf_chunk: int | None = None
    warned: bool = False
    fallbacks: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    owner: owner.NpuOwner | None = None  # the board's NPU lock, held for the life of the process


_state = _State()


_KEEP = object()


def configure(chip: Chip | str | None = None, runtime: Runtime | str | None = None, *,
              gguf_chunk: int | None | object = _KEEP, emulator_options: dict | None = None,
              parallel: bool | None = None) -> Runtime:
    """Select the chip and the matmul runtime for the weights placed from now on.

    chip: a Chip or name; default: $NPULM_CHIP, else the board's device tree, else rk3588 (for the emulator).
    runtime: a Runtime, or "auto" (default: librknnrt when found, else the emulator), "rknn", "emulator".
    gguf_chunk: K per NPU call of the GGUF pipelines (None: the smallest aligned chunk; larger = fewer calls, more
    rows; kept from the previous call when not given). parallel: run the cores on threads (default: on librknnrt).
    The runtime in use is said once on stderr. Each call starts a new model's fallback warning."""
    with _state.lock:
        if isinstance(runtime, Runtime):
            rt = runtime
            if chip is not None and (get_chip(chip) if isinstance(chip, str) else chip) is not rt.chip:
                raise ValueError(f"chip {chip} differs from the runtime's {rt.chip.name}")
        else:
            c = (get_chip(chip) if isinstance(chip, str) else chip) or None
            kind = runtime or None
            cur = _state.runtime
            if cur is not None and (c is None or cur.chip is c) and kind in (None, "auto", cur.kind):
                rt = cur
            else:
                if c is None:
                    c = chip_from_env_or_board()
                rt = open_runtime(kind, c, **(emulator_options or {}))
                if _state.owner is None and owner.wants_lock(rt.kind):
                    _state.owner = owner.claim()  # NpuBusy names the process that holds the board's NPU
        if rt is not _state.runtime:
            if _state.arena is not None:
                log.debug("NPU: switching runtime; weights placed before keep the previous one")
            _state.runtime, _state.arena = rt, Arena(rt, parallel=parallel)
            where = "" if rt.kind == "rknn" else " (no librknnrt: results are the emulator's, not a board's)"
            print(f"npulm: NPU {rt.describe()}{where}", file=sys.stderr)
        if gguf_chunk is not _KEEP:
            _state.gguf_chunk = gguf_chunk
        _state.warned = False
        _state.fallbacks = []
        return rt


def current() -> tuple[Runtime, Arena]:
    """The configured runtime and arena (configured with defaults on first use)."""
    if _state.runtime is None:
        configure()
    return _state.runtime, _state.arena


def fallbacks() -> list[str]:
    """Tensors of the current configuration that run on the CPU because the NPU refused them."""
    return list(_state.fallbacks)


def _warn_fallback(name: str, error: BaseException) -> None:
    with _state.lock:
        _state.fallbacks.append(name)
        first = not _state.warned
        _state.warned = True
    if first:
        warnings.warn(f"npulm: NPU refused {name} ({error}); it and any other refused weight run on the CPU path",
                      NpuFallbackWarning, stacklevel=4)
    else:
        log.info("NPU: %s runs on the CPU: %s", name, error)


class NpuLinear(Linear):
    """y = x @ W.T through an NPU pipeline; the CPU Linear when the NPU refuses the weight."""

    def __init__(self, weight: Weight, spec: str = "npu:auto"):
        super().__init__(weight)
        rt, arena = current()
        requested = spec.split(":", 1)[1] if ":" in spec else "auto"
        # "PIPE@M": per-phase placement, the NPU from M token rows up, the CPU path below (same load)
        requested, _, at = requested.partition("@")
        self.min_m = _min_m(at, spec)
        self._weight = weight  # zero-copy GGUF view: kept for a CPU fallback and the CPU phase
        self._cpu: Linear | None = None
        self._cpu_phase: Linear | None = None
        self._impl: Prepared | None = None
        if requested.lower() != "auto":
            pipeline_spec(requested)  # unknown names are an error, not a fallback
        self.pipeline = resolve(requested, weight.type, rt.chip)
        self.spec = f"npu:{self.pipeline}" + (f"@{self.min_m}" if self.min_m > 1 else "")
        try:
            self._impl = prepare(self.pipeline, weight, arena, gguf_chunk=_state.gguf_chunk)
        except (RknnError, MemoryError) as e:
            self._fall_back(e)
            return
        # free the NPU contexts and memory when the model (and so this Linear) is dropped
        self._finalizer = weakref.finalize(self, self._impl.close)
        self._lock = arena.lock

    def _fall_back(self, error: BaseException) -> None:
        _warn_fallback(self.name, error)
        if self._impl is not None:
            self._impl.close()
            self._impl = None
        self._cpu = make_linear(self._weight, "cpu")
        self.spec = f"cpu (NPU {self.pipeline} refused)"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self._cpu is not None:
            return self._cpu(x)
        if x.shape[0] < self.min_m:  # a phase the NPU is not placed for: the CPU path, exactly
            if self._cpu_phase is None:
                self._cpu_phase = make_linear(self._weight, "cpu")
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

    def describe(self) -> str:
        return self._impl.describe() if self._impl is not None else self.spec


def _min_m(text: str, spec: str) -> int:
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{spec!r}: the part after '@' must be a token count >= 1 (the NPU from that batch size up)")
    return int(text)


def default_pipeline(weight: Weight) -> str:
    """What "npu:auto" picks for a weight on the configured chip."""
    return auto_pipeline(weight.type, current()[0].chip)
