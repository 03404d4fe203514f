"""Which NPU a model's weights use: `open_runtime()` picks librknnrt or the emulator; `NpuDevice` is one model's
runtime, chip and shared arena."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

from . import owner
from .chips import Chip, chip_from_env_or_board, get_chip
from .emulator import EmulatorRuntime
from .layout import nibble_setting
from .librknnrt import RknnRuntime
from .planner import Arena
from .rknn import RknnLoadError, find_library
from .runtime import Runtime

log = logging.getLogger("npulm.npu")

RUNTIME_ENV = "NPULM_NPU_RUNTIME"  # auto | rknn | emulator


def open_runtime(kind: str | None = None, chip: Chip | str | None = None, lib_path: str | None = None,
                 **emulator_options) -> Runtime:
    """librknnrt when `kind` is "rknn", or "auto" (default, or $NPULM_NPU_RUNTIME) and the library is found; the
    emulator otherwise. The choice is logged and visible as `runtime.kind` / `runtime.describe()`."""
    kind = (kind or os.environ.get(RUNTIME_ENV) or "auto").lower()
    nibbles = emulator_options.pop("nibbles", None) or nibble_setting()  # int4 packing order (layout.nibble_setting)
    if kind not in ("auto", "rknn", "emulator"):
        raise ValueError(f"runtime kind must be auto, rknn or emulator, not {kind!r}")
    if kind in ("auto", "rknn"):
        path = lib_path or find_library()
        if path or kind == "rknn":
            try:
                rt: Runtime = RknnRuntime(path, chip, nibbles)
                log.info("NPU: %s (%s)", rt.describe(), rt.lib.path)
                return rt
            except RknnLoadError as e:
                if kind == "rknn":
                    raise
                log.warning("NPU: %s; falling back to the emulator", e)
    rt = EmulatorRuntime(chip, nibbles=nibbles, **emulator_options)
    log.info("NPU: %s", rt.describe())
    return rt


_board: owner.NpuOwner | None = None  # the board's NPU lock: one per process (not per model), held while it lives
_board_lock = threading.Lock()


def claim_board(runtime: Runtime) -> None:
    """Take the board's NPU for this process on the first device that needs it (npulm.npu.owner); NpuBusy names
    the process that has it."""
    global _board
    with _board_lock:
        if _board is None and owner.wants_lock(runtime.kind):
            _board = owner.claim()


class NpuFallbackWarning(RuntimeWarning):
    """A weight placed on the NPU runs on the CPU instead."""


class NpuDevice:
    """One model's NPU: its runtime (librknnrt, else the emulator) and chip, the arena its weights share (IOMMU
    accounting, A/C scratch, the lock that serializes NPU calls, the core threads) and the weights the NPU refused.
    Each model opens its own (`npulm.placement.Placement`): a second model with another chip or runtime changes
    nothing for the first.

    chip: a Chip or name; default: $NPULM_CHIP, else the board's device tree, else rk3588 (for the emulator).
    runtime: a Runtime, or "auto" (default: librknnrt when found, else the emulator), "rknn", "emulator".
    parallel: run the cores on threads (default: on librknnrt). The runtime in use is said once on stderr."""

    def __init__(self, chip: Chip | str | None = None, runtime: Runtime | str | None = None, *,
                 emulator_options: dict | None = None, parallel: bool | None = None):
        want = get_chip(chip) if isinstance(chip, str) else chip
        if isinstance(runtime, Runtime):
            if want is not None and want is not runtime.chip:
                raise ValueError(f"chip {want.name} differs from the runtime's {runtime.chip.name}")
            rt = runtime
        else:
            rt = open_runtime(runtime, want or chip_from_env_or_board(), **(emulator_options or {}))
        claim_board(rt)  # NpuBusy before anything is placed
        self.runtime, self.chip = rt, rt.chip
        self.arena = Arena(rt, parallel=parallel)
        self.fallbacks: list[str] = []
        self._lock = threading.Lock()
        where = "" if rt.kind == "rknn" else " (no librknnrt: results are the emulator's, not a board's)"
        print(f"npulm: NPU {rt.describe()}{where}", file=sys.stderr)

    def refused(self, name: str, error: BaseException) -> None:
        """Record that the NPU refused a weight (it runs on the CPU): one warning per device, the rest logged."""
        with self._lock:
            self.fallbacks.append(name)
            first = len(self.fallbacks) == 1
        if first:
            warnings.warn(f"npulm: NPU refused {name} ({error}); it and any other refused weight run on the CPU path",
                          NpuFallbackWarning, stacklevel=4)
        else:
            log.info("NPU: %s runs on the CPU: %s", name, error)

    def describe(self) -> str:
        return self.runtime.describe()

    def close(self) -> None:
        """Stop the core threads and free the arena's own contexts (after the weights are dropped)."""
        self.arena.close()
