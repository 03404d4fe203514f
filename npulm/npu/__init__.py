"""NPU backend: the RKNPU2 matmul API (librknnrt via ctypes, or an exact numpy emulator) and the pipelines on it.

Runtime layer: `chips` (per-SoC rules), `rknn` (ctypes binding, constants, errors), `layout` (native packing),
`runtime` (the interface: `Runtime` and the API's value types), its two implementations `librknnrt` (`RknnRuntime`)
and `emulator` (`EmulatorRuntime`), `device` (`open_runtime()`), `context` (`MatmulContext`), `doctor` (the
self-test behind `npulm doctor`).
Pipelines: `pipelines` (the one table: each pipeline declared once), `quant` (quantization math), `simulate` (every
pipeline's float64 reference), `prepared` (its NPU realization), `planner` (chunks, cores, contexts, memory).
Backend: `device` (`NpuDevice`: one model's runtime, chip and arena), `backend` (`NpuLinear`), built by
`npulm.placement`. Importing this package imports nothing: import the module you use.
"""
