"""qwen2 (Qwen1.5 / Qwen2 / Qwen2.5): the llama block with q/k/v biases and NEOX (half-split) RoPE."""

from __future__ import annotations

from . import llama
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return llama.build(llama.LlamaConfig.from_gguf(w.gguf.kv, "qwen2", rope_neox=True), w, n_ctx)
