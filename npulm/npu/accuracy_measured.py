"""Measured accuracy of the NPU pipelines (every block linear on the NPU, emulated RK3588), from
`python benchmarks/accuracy.py` of 2026-11-23 (docs/accuracy.md: lee_background, -c 512, 8 chunks, llama-perplexity's
scoring). What `npulm plan` budgets with: nothing in the planner guesses an accuracy. That run predates the KLD
against the CPU path (0.0 here: not measured), except where a later run of the same script is named below;
`python benchmarks/accuracy.py --table` rewrites this file.
"""

# (pipeline, model): (ΔPPL % vs the CPU path, mean KLD vs the float32 reference, mean KLD vs the CPU path, top-1)
MEASURED: dict[tuple[str, str], tuple[float, float, float, float]] = {
    # 2026-12-02: benchmarks/accuracy.py --pipelines W16A16 (against today's CPU path, a16 where it matters)
    ("W16A16", "smollm2-135m"): (0.02, 0.0, 0.00056, 0.999),
    ("W16A16", "gemma3-270m"): (-0.11, 0.0, 0.00064, 0.999),
    ("W8A8_STANDARD", "smollm2-135m"): (6.77, 0.09399, 0.0, 0.816),
    ("W8A8_STANDARD", "gemma3-270m"): (9.98, 0.0969, 0.0, 0.826),
    ("W8A8_CHANNEL", "smollm2-135m"): (1.6, 0.03236, 0.0, 0.884),
    ("W8A8_CHANNEL", "gemma3-270m"): (3.68, 0.03411, 0.0, 0.887),
    ("W8A8_HADAMARD", "smollm2-135m"): (-0.08, 0.0042, 0.0, 0.957),
    ("W8A8_HADAMARD", "gemma3-270m"): (0.24, 0.00312, 0.0, 0.966),
    ("W8A8_GGUF_HADAMARD", "smollm2-135m"): (-0.12, 0.00059, 0.0, 0.987),
    ("W8A8_GGUF_HADAMARD", "gemma3-270m"): (0.04, 0.00073, 0.0, 0.989),
    ("W4A4_HADAMARD", "smollm2-135m"): (429.44, 1.63539, 0.0, 0.371),
    ("W4A4_HADAMARD", "gemma3-270m"): (3102.81, 3.40001, 0.0, 0.231),
    ("W4A4_CHANNEL", "smollm2-135m"): (110.15, 0.71808, 0.0, 0.536),
    ("W4A4_CHANNEL", "gemma3-270m"): (134.16, 0.86066, 0.0, 0.54),
    ("W4A8_CHANNEL", "smollm2-135m"): (48.71, 0.38946, 0.0, 0.651),
    ("W4A8_CHANNEL", "gemma3-270m"): (58.4, 0.44123, 0.0, 0.646),
    # 2026-12-02: benchmarks/accuracy.py --pipelines W4A8_BLOCK
    ("W4A8_BLOCK", "smollm2-135m"): (79.39, 0.62114, 0.62104, 0.582),
    ("W4A8_GGUF_BLOCK", "smollm2-135m"): (-0.28, 0.00277, 0.0, 0.97),
    ("W4A8_GGUF_BLOCK", "gemma3-270m"): (-0.23, 0.00185, 0.0, 0.974),
    ("W4A4_GGUF_BLOCK", "smollm2-135m"): (85.36, 0.64179, 0.0, 0.56),
    ("W4A4_GGUF_BLOCK", "gemma3-270m"): (64.63, 0.50465, 0.0, 0.639),
    ("W4A4_GGUF_HADAMARD", "smollm2-135m"): (13.25, 0.13849, 0.0, 0.779),
    ("W4A4_GGUF_HADAMARD", "gemma3-270m"): (12.93, 0.14231, 0.0, 0.797),
}
