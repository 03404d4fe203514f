"""Measured accuracy of the NPU pipelines (every block linear on the NPU, emulated
RK3588), written by `python benchmarks/accuracy.py` on 2026-12-02 (lee_background,
-c 512, llama-perplexity's scoring). What `npulm plan` budgets with: nothing in the planner guesses an accuracy.
"""

# (pipeline, model): (ΔPPL % vs the CPU path, mean KLD vs the float32 reference, mean KLD vs the CPU path, top-1)
MEASURED: dict[tuple[str, str], tuple[float, float, float, float]] = {
    ('W16A16', 'smollm2-135m'): (+0.022, 2.811e-06, 5.641e-04, 0.9985),
    ('W8A8_STANDARD', 'smollm2-135m'): (+6.299, 9.143e-02, 9.170e-02, 0.8127),
    ('W8A8_CHANNEL', 'smollm2-135m'): (+2.976, 3.059e-02, 3.086e-02, 0.8882),
    ('W8A8_HADAMARD', 'smollm2-135m'): (+0.705, 4.270e-03, 4.841e-03, 0.9578),
    ('W8A16_CHANNEL', 'smollm2-135m'): (+0.157, 3.185e-03, 3.685e-03, 0.9613),
    ('W8A16_HADAMARD', 'smollm2-135m'): (+0.466, 2.386e-03, 3.012e-03, 0.9652),
    ('W4A4_HADAMARD', 'smollm2-135m'): (+418.354, 1.628e+00, 1.628e+00, 0.3569),
    ('W4A4_CHANNEL', 'smollm2-135m'): (+105.871, 7.196e-01, 7.189e-01, 0.5431),
    ('W4A8_CHANNEL', 'smollm2-135m'): (+49.218, 3.888e-01, 3.889e-01, 0.6525),
    ('W4A8_BLOCK', 'smollm2-135m'): (+79.387, 6.211e-01, 6.210e-01, 0.5819),
    ('W16A16', 'gemma3-270m'): (-0.106, 1.716e-06, 6.390e-04, 0.9985),
    ('W8A8_STANDARD', 'gemma3-270m'): (+11.474, 9.843e-02, 9.900e-02, 0.8221),
    ('W8A8_CHANNEL', 'gemma3-270m'): (+2.329, 3.133e-02, 3.215e-02, 0.8971),
    ('W8A8_HADAMARD', 'gemma3-270m'): (-0.082, 3.241e-03, 4.008e-03, 0.9676),
    ('W8A16_CHANNEL', 'gemma3-270m'): (+0.154, 3.393e-03, 3.993e-03, 0.9667),
    ('W8A16_HADAMARD', 'gemma3-270m'): (-0.042, 1.901e-03, 2.655e-03, 0.9735),
    ('W4A4_HADAMARD', 'gemma3-270m'): (+3274.769, 3.466e+00, 3.466e+00, 0.2201),
    ('W4A4_CHANNEL', 'gemma3-270m'): (+144.550, 8.845e-01, 8.838e-01, 0.5284),
    ('W4A8_CHANNEL', 'gemma3-270m'): (+58.630, 4.425e-01, 4.430e-01, 0.6446),
    ('W4A8_BLOCK', 'gemma3-270m'): (+77.571, 5.556e-01, 5.555e-01, 0.6240),
}
