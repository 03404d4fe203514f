"""NPU backend: the RKNPU2 matmul API (librknnrt via ctypes, or an exact numpy emulator) and the pipelines on it.

Runtime layer: `chips` (per-SoC rules), `rknn` (ctypes binding, constants, errors), `layout` (native packing),
`emulator` (numpy implementation), `runtime` (`open_runtime()`, `Runtime`, `MatmulContext`).
Backend: `quant` (quantization math), `pipelines` (the named pipelines), `planner` (chunks, cores, contexts, memory),
`backend` (`NpuLinear`, `configure`). Importing this package registers the "npu" matmul backend; the heavy modules
load on first use.
"""

from __future__ import annotations

from ..linear import Linear, Weight, register_backend

_LAZY = {
    "open_runtime": "runtime", "Runtime": "runtime", "MatmulContext": "runtime", "MatmulInfo": "runtime",
    "RknnRuntime": "runtime", "EmulatorRuntime": "emulator", "Chip": "chips", "get_chip": "chips",
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
