"""rwkv7 (RWKV-7 "Goose"): static token-shift lerps, low-rank decay / in-context learning rate / value-residual /
gate projections, the generalized delta rule WKV-7, the first layer's values mixed into every later layer. See
rwkv.py."""

from __future__ import annotations

from . import rwkv
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return rwkv.from_gguf(w, n_ctx, 7)
