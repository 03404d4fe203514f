"""qwen3 (Qwen3 dense): the llama block without biases, with a per-head RMSNorm of q and k before NEOX RoPE."""

from __future__ import annotations

from . import llama
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return llama.build(llama.LlamaConfig.from_gguf(w.gguf.kv, "qwen3", rope_neox=True), w, n_ctx)
