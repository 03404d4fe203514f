"""rwkv6 (RWKV-6 "Finch"): data-dependent token shift through a 5-way low-rank mix, data-dependent decay, WKV-6 with
the per-head bonus u ("time_mix_first"), SiLU gate, receptance-gated channel mix. See rwkv.py."""

from __future__ import annotations

from . import rwkv
from .base import Model, WeightLoader


def from_gguf(w: WeightLoader, n_ctx: int) -> Model:
    return rwkv.from_gguf(w, n_ctx, 6)
