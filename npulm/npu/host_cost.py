"""Host (CPU) time around one NPU invocation of each pipeline, measured on the development VM
(x86_64) by `python benchmarks/npu_overhead.py --fit` (2026-12-02, CPU time of the calling
thread, emulator with a no-op run, caller-thread dispatch, one BLAS thread): seconds = per_call + per_elem x
(A values + C values). The cost model scales these to the board's CPU by its host_a76_factor. Regenerate after
changing a pipeline's host work.
"""

HOST_COST: dict[str, tuple[float, float]] = {  # pipeline: (per_call s, per_elem s)
    'W16A16': (5.469e-06, 1.369e-09),
    'W4A4_CHANNEL': (2.228e-05, 4.692e-09),
    'W4A4_HADAMARD': (2.220e-05, 4.148e-09),
    'W4A8_BLOCK': (3.966e-05, 4.036e-09),
    'W4A8_CHANNEL': (4.006e-05, 4.198e-09),
    'W8A16_CHANNEL': (1.366e-05, 2.334e-09),
    'W8A16_HADAMARD': (1.635e-05, 2.955e-09),
    'W8A8_CHANNEL': (8.636e-06, 1.580e-09),
    'W8A8_HADAMARD': (1.343e-05, 3.230e-09),
    'W8A8_STANDARD': (2.566e-05, 4.252e-09),
}
