"""gemma3: embedding scaled by sqrt(n_embd); q/k RMSNorm per head; NEOX RoPE with a different base on
sliding-window layers (5 of every 6) than on global ones; post-attention and post-MLP norms; GeGLU; tied output.
Follows llama.cpp's gemma3 graph."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Embedding, Model, WeightLoader, hparam, output_linear
from .blocks import AttentionShape, Rope, attend, gated_mlp, gelu, rms_norm
from .cache import KVCache
from .llama import LlamaConfig


@dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    head_dim_v: int = 0
    sliding_window: int = 0
    swa_layers: tuple[bool, ...] = ()
    rope_base_swa: float = 10000.0
    attn_scale: float = 1.0

    @classmethod
    def from_gguf(cls, kv: dict[str, Any], arch: str = "gemma3", rope_neox: bool = True) -> Gemma3Config:
        base = LlamaConfig.from_gguf(kv, arch, rope_neox=True)
        window = hparam(kv, arch, "attention.sliding_window", 0)
        pattern = hparam(kv, arch, "attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, np.ndarray)):  # per-layer flags
            swa = tuple(bool(p) for p in pattern[:base.n_layer])
        else:  # every n-th layer is global, as llama.cpp's set_swa_pattern
            swa = tuple(window > 0 and (pattern == 0 or i % pattern < pattern - 1) for i in range(base.n_layer))
        # llama.cpp: 1/sqrt(n_embd/n_head) for the 27B (62 layers), 1/sqrt(head_dim) otherwise
        scale = 1 / math.sqrt(base.n_embd / base.n_head if base.n_layer == 62 else base.head_dim)
        return cls(**base.__dict__, head_dim_v=hparam(kv, arch, "attention.value_length", base.head_dim),
                   sliding_window=window if window > 0 else 0, swa_layers=swa,
                   rope_base_swa=hparam(kv, arch, "rope.freq_base_swa", 10000.0), attn_scale=scale)


class Gemma3Block:
    def __init__(self, cfg: Gemma3Config, w: WeightLoader, i: int, rope: Rope):
        p = f"blk.{i}."
        v = w.vector
        self.attn_norm, self.q_norm, self.k_norm = v(p + "attn_norm.weight"), v(p + "attn_q_norm.weight"), v(
            p + "attn_k_norm.weight")
        self.post_attn_norm, self.ffn_norm = v(p + "post_attention_norm.weight"), v(p + "ffn_norm.weight")
        self.post_ffn_norm = v(p + "post_ffw_norm.weight")
        self.wq, self.wk, self.wv = (w.linear(p + f"attn_{n}.weight") for n in "qkv")
        self.wo = w.linear(p + "attn_output.weight")
        self.gate, self.up, self.down = (w.linear(p + f"ffn_{n}.weight") for n in ("gate", "up", "down"))
        self.cfg, self.rope = cfg, rope
        window = cfg.sliding_window if cfg.swa_layers[i] else 0
        self.shape = AttentionShape(cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.head_dim_v, cfg.attn_scale, window)

    def make_cache(self, n_ctx: int) -> KVCache:
        return KVCache(self.cfg.n_head_kv, n_ctx, self.cfg.head_dim, self.cfg.head_dim_v)

    def __call__(self, x: np.ndarray, caches: Sequence[KVCache], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        c, m, eps = self.cfg, x.shape[0], self.cfg.norm_eps
        h = rms_norm(x, self.attn_norm, eps)
        q = rms_norm(self.wq(h).reshape(m, c.n_head, c.head_dim), self.q_norm, eps)
        k = rms_norm(self.wk(h).reshape(m, c.n_head_kv, c.head_dim), self.k_norm, eps)
        v = self.wv(h).reshape(m, c.n_head_kv, c.head_dim_v)
        x = x + rms_norm(self.wo(attend(q, k, v, caches, spans, self.rope, self.shape)), self.post_attn_norm, eps)
        h = rms_norm(x, self.ffn_norm, eps)
        return x + rms_norm(gated_mlp(h, self.gate, self.up, self.down, act=gelu), self.post_ffn_norm, eps)


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    cfg = Gemma3Config.from_gguf(w.gguf.kv)
    rope_global = Rope(cfg.n_rot, cfg.rope_base, n_ctx, cfg.rope_scale, neox=True)
    rope_local = Rope(cfg.n_rot, cfg.rope_base_swa, n_ctx, 1.0, neox=True)
    blocks = [Gemma3Block(cfg, w, i, rope_local if cfg.swa_layers[i] else rope_global)
              for i in range(cfg.n_layer)]
    embedding = Embedding(w.gguf_weight("token_embd.weight"), scale=math.sqrt(cfg.n_embd))
    return Model(cfg, embedding, blocks, w.vector("output_norm.weight"), output_linear(w), cfg.norm_eps, n_ctx,
                 w.linears)
