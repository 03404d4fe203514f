"""NPU backend: the RKNPU2 matmul API (librknnrt via ctypes, or an exact numpy emulator) and the pipelines on it.

Runtime layer: `chips` (per-SoC rules), `rknn` (ctypes binding, constants, errors), `layout` (native packing),
`runtime` (the interface: `Runtime` and the API's value types), its two implementations `librknnrt` (`RknnRuntime`)
and `emulator` (`EmulatorRuntime`), `device` (`open_runtime()`), `context` (`MatmulContext`), `doctor` (the
self-test behind `npulm doctor`).
Backend: `quant` (quantization math), `pipelines` (the named pipelines), `planner` (chunks, cores, contexts, memory),
`backend` (`NpuLinear`, `configure`). Importing this package registers the "npu" matmul backend; the heavy modules
load on first use.
"""

from __future__ import annotations

from ..linear import Linear, Weight, register_backend

_LAZY = {
    "open_runtime": "device", "Runtime": "runtime", "MatmulContext": "context", "MatmulInfo": "runtime",
    "RknnRuntime": "librknnrt", "EmulatorRuntime": "emulator", "Chip": "chips", "get_chip": "chips",
    "detect_chip": "chips", "RknnError": "rknn", "NpuLinear": "backend", "PIPELINES": "pipelines",
    "auto_pipeline": "pipelines", "current": "backend", "fallbacks": "backend",
}


def configure(chip=None, runtime=None, **options):
    """Select the NPU chip and runtime for the weights placed from now on (see `npulm.npu.backend.configure`)."""
    from .backend import configure as _configure

    return _configure(chip, runtime, **options)


def _factory(weight: Weight, spec: str) -> Linear:
    from .backend import NpuLinear

    return NpuLinear(weight, spec)


register_backend("npu", _factory)


def __getattr__(name: str):  # keep `import npulm.npu` light until something is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
