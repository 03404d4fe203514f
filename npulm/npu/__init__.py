"""NPU backend: the RKNPU2 matmul API (librknnrt via ctypes, or an exact numpy emulator) and the pipelines on it.

Runtime layer: `chips` (per-SoC rules), `rknn` (ctypes binding, constants, errors), `layout` (native packing),
`emulator` (numpy implementation), `runtime` (`open_runtime()`, `Runtime`, `MatmulContext`).
"""

from __future__ import annotations

_LAZY = {
    "open_runtime": "runtime", "Runtime": "runtime", "MatmulContext": "runtime", "MatmulInfo": "runtime",
    "RknnRuntime": "runtime", "EmulatorRuntime": "emulator", "Chip": "chips", "get_chip": "chips",
    "detect_chip": "chips", "RknnError": "rknn",
}


def __getattr__(name: str):  # keep `import npulm.npu` light until something is used
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
