"""qwen3moe (Qwen3-30B-A3B, Qwen3-235B-A22B): the qwen3 block with a mixture of experts (softmax router, top-k
weights renormalized) instead of the MLP."""

from __future__ import annotations

from . import llama
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return llama.build(llama.LlamaConfig.from_gguf(w.gguf.kv, "qwen3moe", rope_neox=True), w, n_ctx)
