"""Embeddings against llama.cpp's (llama-cpp-python, embedding=True) on the real models: on 20 sentences, the same
pooling on both sides, a mean cosine >= 0.9995 (SmolLM2) / 0.999 (Gemma-3) and every sentence >= 0.998. Marked
`oracle`; skipped without llama-cpp-python."""

from __future__ import annotations

import numpy as np
import pytest

from npulm import assets
from npulm.api import Llama

pytestmark = [pytest.mark.oracle, pytest.mark.slow]
llama_cpp = pytest.importorskip("llama_cpp")

SENTENCES = [
    "The cat sat on the mat.", "Stock markets fell sharply on Monday.", "Photosynthesis turns light into sugar.",
    "She plays the violin every evening.", "The train to Paris leaves at noon.", "Quantum computers use qubits.",
    "He forgot his umbrella in the rain.", "Bread rises because of yeast.", "The river flooded the village.",
    "Chess is a game of strategy.", "A new vaccine was approved today.", "The museum opens at nine.",
    "Volcanoes can erupt without warning.", "They planted tomatoes in spring.", "The bridge was built in 1890.",
    "Whales communicate with songs.", "The library lends e-books now.", "Rain is expected this weekend.",
    "Honey never spoils.", "The team won the championship.",
]


# On Gemma-3's Q4_K_M file llama.cpp rounds its activations to 8 bits per 256 inputs (q8_K) in every quantized
# matmul; that alone moves its embeddings by a cosine of ~1e-3 (llama.cpp against itself on the same weights in F32,
# printed below). On the same weights in F32, llama.cpp's embeddings equal npulm's float path (cosine 1.00000) and
# npulm's default kernels (16-bit activations where they reach the output most) stay above 0.9998.
# The mean catches a drift of every sentence; the least sentence (SmolLM2: "The cat sat on the mat.", ~0.999)
# moves by ~1e-4 with float rounding alone (the order of a sum in attention), so it gets its own bound.
MIN_MEAN_COSINE = {assets.SMOLLM2: 0.9995, assets.GEMMA3: 0.999}
MIN_COSINE = 0.998


def _llama_cpp_embed(path: str, pooling: int) -> np.ndarray:
    theirs = llama_cpp.Llama(path, embedding=True, pooling_type=pooling, n_ctx=512, n_threads=2, verbose=False)
    try:
        return np.asarray(theirs.embed(SENTENCES, normalize=True))
    finally:
        del theirs


@pytest.mark.parametrize("model, pooling", [(assets.SMOLLM2, 1), (assets.SMOLLM2, 3), (assets.GEMMA3, 1)])
def test_embeddings_match_llama_cpp(model, pooling):  # pooling: llama.cpp's LLAMA_POOLING_TYPE_MEAN 1, _LAST 3
    path = str(assets.model_path(model))
    want = _llama_cpp_embed(path, pooling)
    ours = Llama(path, pooling_type=pooling, n_ctx=512, verbose=False)
    got = np.asarray(ours.embed(SENTENCES, normalize=True))
    cos = (want * got).sum(axis=1)
    print(f"\n{model} pooling {pooling}: cosine min {cos.min():.5f}, mean {cos.mean():.5f}")
    assert cos.mean() >= MIN_MEAN_COSINE[model] and cos.min() >= MIN_COSINE


@pytest.mark.parametrize("pooling", [1, 3])
def test_gemma3_embeddings_match_llama_cpp_on_the_same_weights(pooling, tmp_path):
    """llama.cpp on Gemma-3's weights stored as F32 (no activation rounding on its side): >= 0.999 for the default
    kernels, >= 0.9999 for the float path; and how far llama.cpp's own Q4_K_M run is from it."""
    from gguf_writers import write_dequantized_copy

    path = assets.model_path(assets.GEMMA3)
    write_dequantized_copy(path, tmp_path / "gemma3-f32.gguf")
    want = _llama_cpp_embed(str(tmp_path / "gemma3-f32.gguf"), pooling)
    theirs_q = _llama_cpp_embed(str(path), pooling)
    got = np.asarray(Llama(str(path), pooling_type=pooling, n_ctx=512, verbose=False).embed(SENTENCES,
                                                                                             normalize=True))
    ref = np.asarray(Llama(str(path), pooling_type=pooling, n_ctx=512, verbose=False,
                           tensor_overrides=["*=cpu-ref"]).embed(SENTENCES, normalize=True))
    cos, cos_ref, cos_theirs = ((want * v).sum(axis=1) for v in (got, ref, theirs_q))
    print(f"\ngemma3 pooling {pooling} against llama.cpp on F32 weights: npulm min {cos.min():.5f}, float path "
          f"{cos_ref.min():.5f}; llama.cpp's own Q4_K_M run {cos_theirs.min():.5f}")
    assert cos.min() >= 0.999 and cos_ref.min() >= 0.9999
