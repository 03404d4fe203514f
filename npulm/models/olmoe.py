"""olmoe (OLMoE-1B-7B): the llama block with RMSNorms of q and k over all heads, NEOX RoPE, and a mixture of
experts whose top-k softmax weights are used as they are (not renormalized)."""

from __future__ import annotations

from . import llama
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return llama.build(llama.LlamaConfig.from_gguf(w.gguf.kv, "olmoe", rope_neox=True), w, n_ctx)
