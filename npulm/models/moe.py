"""Mixture-of-experts feed-forward, as llama.cpp's build_moe_ffn with softmax gating (Mixtral in `llama` files,
Qwen3-MoE, OLMoE).

The router runs on the CPU (its float logits pick the experts: a rounding on another path could flip a choice).
Per call, the M tokens are grouped by the experts they selected, so each selected expert runs ONE gated MLP over
its own tokens (M_e = how many chose it) instead of one matmul per token and slot. Each expert's gate / up / down is a
`Linear` over a zero-copy view of its slice of the GGUF's 3-D tensor, placed by the tensor's name like any weight
(`-ot 'blk.*.ffn_*_exps.*=cpu'` keeps the experts on the CPU while the rest runs on the NPU).
"""

from __future__ import annotations

import numpy as np

from ..linear import Linear, Weight
from .base import WeightLoader, hparam
from .blocks import gated_mlp

# Architectures that use the selected experts' probabilities as they are instead of renormalized over the top k
# (llama.cpp's norm_w = false).
UNNORMALIZED = frozenset({"olmoe"})


def expert_linears(w: WeightLoader, name: str) -> list[Linear]:
    """One Linear per expert of the 3-D tensor `name`, all placed by the tensor's GGUF name."""
    views = Weight.experts_from_gguf(w.gguf, name)
    spec = w.spec_for(views[0])
    linears = [w.build(v, spec) for v in views]
    w.linears.extend(linears)
    return linears


class MoE:
    """sum over the k selected experts e of p_e * down_e(silu(gate_e(x)) * up_e(x)), p = softmax(router(x))."""

    def __init__(self, router: Linear, gate: list[Linear], up: list[Linear], down: list[Linear], n_used: int,
                 normalize: bool = True, scale: float = 0.0):
        if not 0 < n_used <= len(gate) == len(up) == len(down) == router.n_out:
            raise ValueError(f"{router.name}: {n_used} of {router.n_out} experts used, with {len(gate)} / "
                             f"{len(up)} / {len(down)} expert gate / up / down matrices")
        self.router, self.gate, self.up, self.down = router, gate, up, down
        self.n_expert, self.n_used, self.normalize, self.scale = len(gate), n_used, normalize, scale
        self.n_embd = down[0].n_out

    @classmethod
    def from_gguf(cls, w: WeightLoader, prefix: str) -> MoE:
        arch, kv = w.gguf.architecture, w.gguf.kv
        router = w.build(w.gguf_weight(prefix + "ffn_gate_inp.weight"), "cpu")
        w.linears.append(router)
        gate, up, down = (expert_linears(w, prefix + f"ffn_{n}_exps.weight") for n in ("gate", "up", "down"))
        return cls(router, gate, up, down, hparam(kv, arch, "expert_used_count"), arch not in UNNORMALIZED,
                   hparam(kv, arch, "expert_weights_scale", 0.0))

    def route(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The selected experts (M, k), best first, and their weights (M, k)."""
        logits = self.router(x)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        chosen = np.argsort(-probs, axis=1, kind="stable")[:, :self.n_used]
        weights = np.take_along_axis(probs, chosen, axis=1)
        if self.normalize:  # clamped as llama.cpp (the smallest float16 normal)
            weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.float32(6.103515625e-5))
        if self.scale not in (0.0, 1.0):
            weights *= np.float32(self.scale)
        return chosen, weights.astype(np.float32)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        chosen, weights = self.route(x)
        # tokens grouped by expert: a stable sort of the (token, slot) pairs by expert id
        flat = chosen.reshape(-1)
        order = np.argsort(flat, kind="stable")
        counts = np.bincount(flat, minlength=self.n_expert)
        rows, row_weights = order // self.n_used, weights.reshape(-1)[order]
        out = np.zeros((x.shape[0], self.n_embd), np.float32)
        start = 0
        for e in np.flatnonzero(counts):
            stop = start + counts[e]
            r = rows[start:stop]  # distinct tokens: a token selects an expert at most once
            y = gated_mlp(np.ascontiguousarray(x[r]), self.gate[e], self.up[e], self.down[e])
            out[r] += y * row_weights[start:stop, None]
            start = stop
        return out
