"""llama (SmolLM2, Llama 1-3, Mistral, Mixtral...): pre-norm blocks, grouped-query attention, RoPE on adjacent pairs,
SwiGLU MLP. What the file has loads too: q/k/v biases (qwen2), q/k RMSNorms (qwen3 per head, olmoe over all heads),
a mixture of experts instead of the MLP (Mixtral, qwen3moe, olmoe; see moe.py)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Embedding, Model, WeightLoader, hparam, output_linear
from .blocks import AttentionShape, Rope, attend, gated_mlp, rms_norm
from .cache import KVCache
from .moe import MoE
from .validate import check_config


@dataclass(frozen=True)
class LlamaConfig:
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_scale: float  # position multiplier (1 / linear scaling factor)
    n_rot: int
    rope_neox: bool = False

    def __post_init__(self) -> None:
        check_config(self)  # relations between hyper-parameters, before any block is built

    @classmethod
    def from_gguf(cls, kv: dict[str, Any], arch: str = "llama", rope_neox: bool = False) -> LlamaConfig:
        n_embd, n_head = hparam(kv, arch, "embedding_length"), hparam(kv, arch, "attention.head_count")
        head_dim = hparam(kv, arch, "attention.key_length", n_embd // n_head)
        factor = hparam(kv, arch, "rope.scaling.factor", 0.0) or hparam(kv, arch, "rope.scale_linear", 0.0)
        return cls(
            n_layer=hparam(kv, arch, "block_count"),
            n_embd=n_embd,
            n_head=n_head,
            n_head_kv=hparam(kv, arch, "attention.head_count_kv", n_head),
            head_dim=head_dim,
            n_ff=hparam(kv, arch, "feed_forward_length"),
            n_ctx_train=hparam(kv, arch, "context_length"),
            norm_eps=hparam(kv, arch, "attention.layer_norm_rms_epsilon", 1e-5),
            rope_base=hparam(kv, arch, "rope.freq_base", 10000.0),
            rope_scale=1.0 / factor if factor else 1.0,
            n_rot=hparam(kv, arch, "rope.dimension_count", head_dim),
            rope_neox=rope_neox,
        )


class LlamaBlock:
    def __init__(self, cfg: LlamaConfig, w: WeightLoader, i: int, rope: Rope):
        p = f"blk.{i}."
        self.attn_norm, self.ffn_norm = w.vector(p + "attn_norm.weight"), w.vector(p + "ffn_norm.weight")
        self.wq, self.wk, self.wv = w.linear(p + "attn_q.weight"), w.linear(p + "attn_k.weight"), w.linear(
            p + "attn_v.weight")
        self.bq, self.bk, self.bv = (w.optional_vector(p + f"attn_{n}.bias") for n in "qkv")
        self.q_norm, self.k_norm = (w.optional_vector(p + f"attn_{n}_norm.weight") for n in "qk")
        self.wo = w.linear(p + "attn_output.weight")
        self.moe = MoE.from_gguf(w, p) if w.has(p + "ffn_gate_inp.weight") else None
        if self.moe is None:
            self.gate, self.up, self.down = (w.linear(p + f"ffn_{n}.weight") for n in ("gate", "up", "down"))
        self.cfg, self.rope = cfg, rope
        self.shape = AttentionShape(cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim, 1 / math.sqrt(cfg.head_dim))

    def make_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg.n_head_kv, n_ctx, self.cfg.head_dim, self.cfg.head_dim)

    def __call__(self, x: np.ndarray, caches: Sequence[KVCache], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        c, m = self.cfg, x.shape[0]
        h = rms_norm(x, self.attn_norm, c.norm_eps)
        q, k, v = self.wq(h), self.wk(h), self.wv(h)
        if self.bq is not None:
            q, k, v = q + self.bq, k + self.bk, v + self.bv
        if self.q_norm is not None:  # the norm's length says per head (qwen3) or over all heads (olmoe)
            q = rms_norm(q.reshape(m, -1, len(self.q_norm)), self.q_norm, c.norm_eps)
            k = rms_norm(k.reshape(m, -1, len(self.k_norm)), self.k_norm, c.norm_eps)
        q, k, v = (t.reshape(m, -1, c.head_dim) for t in (q, k, v))
        x = x + self.wo(attend(q, k, v, caches, spans, self.rope, self.shape))
        h = rms_norm(x, self.ffn_norm, c.norm_eps)
        return x + (self.moe(h) if self.moe is not None else gated_mlp(h, self.gate, self.up, self.down))


def build(cfg: LlamaConfig, w: WeightLoader, n_ctx: int) -> Model:
    rope = Rope(cfg.n_rot, cfg.rope_base, n_ctx, cfg.rope_scale, neox=cfg.rope_neox)
    blocks = [LlamaBlock(cfg, w, i, rope) for i in range(cfg.n_layer)]
    embedding = Embedding(w.gguf_weight("token_embd.weight"))
    return Model(cfg, embedding, blocks, w.vector("output_norm.weight"), output_linear(w), cfg.norm_eps, n_ctx,
                 w.linears)


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return build(LlamaConfig.from_gguf(w.gguf.kv, "llama"), w, n_ctx)
