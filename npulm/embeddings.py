"""Embeddings as llama.cpp computes them: the hidden states after the output norm (causal attention, as the model
runs for generation), pooled over a text's tokens the way the GGUF declares (`{arch}.pooling_type`), optionally
L2-normalized. Pooling NONE gives one vector per token (llama-cpp-python's shape for models that declare none).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# llama.cpp's enum llama_pooling_type (RANK, a reranker head, is not supported)
POOLING_NONE, POOLING_MEAN, POOLING_CLS, POOLING_LAST = 0, 1, 2, 3
POOLING_NAMES = {"none": POOLING_NONE, "mean": POOLING_MEAN, "cls": POOLING_CLS, "last": POOLING_LAST}


def parse_pooling(pooling: int | str | None, declared: int) -> int:
    """A pooling argument: None or -1 (llama.cpp's UNSPECIFIED) -> what the GGUF declares; a name or enum value."""
    if pooling is None or pooling == -1:
        return declared
    if isinstance(pooling, str):
        if pooling.lower() not in POOLING_NAMES:
            raise ValueError(f"pooling {pooling!r} is not one of {', '.join(POOLING_NAMES)}")
        return POOLING_NAMES[pooling.lower()]
    if pooling not in POOLING_NAMES.values():
        raise ValueError(f"pooling_type {pooling!r} is not supported (0 none, 1 mean, 2 cls, 3 last)")
    return int(pooling)


def declared_pooling(kv: dict, arch: str) -> int:
    return int(kv.get(f"{arch}.pooling_type", POOLING_NONE))


def pool(hidden: np.ndarray, pooling: int) -> np.ndarray:
    """(M, d) token states -> (d,) by mean, first (CLS) or last token; NONE keeps (M, d)."""
    if pooling == POOLING_MEAN:
        return hidden.mean(axis=0, dtype=np.float64).astype(np.float32)
    if pooling == POOLING_CLS:
        return hidden[0]
    if pooling == POOLING_LAST:
        return hidden[-1]
    return hidden


def normalize(v: np.ndarray) -> np.ndarray:
    """Euclidean normalization of the last axis (llama.cpp's default, embd_normalize = 2); zero vectors stay zero."""
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1)


def embed_tokens(model, cache: list, token_lists: Sequence[Sequence[int]], pooling: int,
                 normalized: bool) -> list[np.ndarray]:
    """Embeddings of several token sequences, each run alone in `cache` (reset before each)."""
    out = []
    for tokens in token_lists:
        for layer in cache:
            layer.reset()
        v = pool(model.hidden(tokens, cache), pooling)
        out.append(normalize(v) if normalized else v)
    for layer in cache:
        layer.reset()
    return out
