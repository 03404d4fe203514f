"""Which NPU runtime a model's weights use: `open_runtime()` picks librknnrt or the emulator."""

from __future__ import annotations

import logging
import os

from .chips import Chip
from .emulator import EmulatorRuntime
from .librknnrt import RknnRuntime
from .rknn import RknnLoadError, find_library
from .runtime import Runtime

log = logging.getLogger("npulm.npu")

RUNTIME_ENV = "NPULM_NPU_RUNTIME"  # auto | rknn | emulator


def open_runtime(kind: str | None = None, chip: Chip | str | None = None, lib_path: str | None = None,
                 **emulator_options) -> Runtime:
    """librknnrt when `kind` is "rknn", or "auto" (default, or $NPULM_NPU_RUNTIME) and the library is found; the
    emulator otherwise. The choice is logged and visible as `runtime.kind` / `runtime.describe()`."""
    kind = (kind or os.environ.get(RUNTIME_ENV) or "auto").lower()
    if kind not in ("auto", "rknn", "emulator"):
        raise ValueError(f"runtime kind must be auto, rknn or emulator, not {kind!r}")
    if kind in ("auto", "rknn"):
        path = lib_path or find_library()
        if path or kind == "rknn":
            try:
                rt: Runtime = RknnRuntime(path, chip)
                log.info("NPU: %s (%s)", rt.describe(), rt.lib.path)
                return rt
            except RknnLoadError as e:
                if kind == "rknn":
                    raise
                log.warning("NPU: %s; falling back to the emulator", e)
    rt = EmulatorRuntime(chip, **emulator_options)
    log.info("NPU: %s", rt.describe())
    return rt
