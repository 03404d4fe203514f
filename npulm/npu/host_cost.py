"""Host (CPU) time around one NPU invocation of each pipeline, measured on the development VM
(x86_64) by `python benchmarks/npu_overhead.py --fit` (2026-12-02, CPU time of the calling
thread, emulator with a no-op run, caller-thread dispatch, one BLAS thread): seconds = per_call + per_elem x
(A values + C values). The cost model scales these to the board's CPU by its host_a76_factor. Regenerate after
changing a pipeline's host work.
"""

HOST_COST: dict[str, tuple[float, float]] = {  # pipeline: (per_call s, per_elem s)
    'W16A16': (1.827e-05, 3.521e-09),
    'W4A4_CHANNEL': (9.034e-05, 8.871e-09),
    'W4A4_HADAMARD': (5.635e-05, 6.209e-09),
    'W4A8_BLOCK': (1.324e-04, 6.152e-09),
    'W4A8_CHANNEL': (1.094e-04, 7.477e-09),
    'W8A16_CHANNEL': (1.253e-05, 2.051e-09),
    'W8A16_HADAMARD': (2.243e-05, 3.081e-09),
    'W8A8_CHANNEL': (2.755e-05, 3.464e-09),
    'W8A8_HADAMARD': (1.770e-05, 3.131e-09),
    'W8A8_STANDARD': (2.566e-05, 4.252e-09),
}
