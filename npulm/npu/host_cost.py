"""Host (CPU) time around one NPU invocation of each pipeline, measured on the development VM
(x86_64) by `python benchmarks/npu_overhead.py --fit` (2026-12-02, emulator with a no-op run,
caller-thread dispatch, one BLAS thread): seconds = per_call + per_elem x (A values + C values). The cost model
scales these to the board's CPU by its host_a76_factor. Regenerate after changing a pipeline's host work.
"""

HOST_COST: dict[str, tuple[float, float]] = {  # pipeline: (per_call s, per_elem s)
    'W16A16': (1.330e-05, 2.511e-08),
    'W4A4_CHANNEL': (4.031e-04, 6.073e-08),
    'W4A4_GGUF_BLOCK': (5.096e-04, 2.510e-08),
    'W4A4_GGUF_HADAMARD': (5.133e-04, 4.171e-08),
    'W4A4_HADAMARD': (5.646e-04, 6.670e-08),
    'W4A8_CHANNEL': (1.206e-04, 4.013e-08),
    'W4A8_GGUF_BLOCK': (9.441e-04, 2.147e-08),
    'W8A8_CHANNEL': (8.340e-05, 2.396e-08),
    'W8A8_GGUF_HADAMARD': (2.994e-04, 3.459e-08),
    'W8A8_HADAMARD': (2.606e-04, 4.932e-08),
    'W8A8_STANDARD': (8.660e-05, 2.772e-08),
}
