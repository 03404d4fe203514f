"""RWKV-6 and RWKV-7 (GGUF `rwkv6` / `rwkv7`), following llama.cpp's graphs: LayerNorms (with biases), token shift
(each block mixes a token's normed input with the previous token's), time-mix with the WKV recurrence over a
per-head (head_size x head_size) state, group norm, channel-mix.

Every projection, the low-rank (LoRA-style) decay / mixing ones included, is a `Linear`, so placement puts it on any
CPU kernel or NPU pipeline; they run over all M tokens of a call at once. Only the WKV recurrence steps through the
tokens (in the C extension where built, numpy otherwise). The per-sequence state (the two token-shift rows and the
WKV matrices of each layer) is the model's cache: `make_cache()` makes it, the caller owns it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..linear import Linear, Weight
from .base import Embedding, Model, WeightLoader, hparam
from .blocks import silu

try:
    from ..cpu import _kernels as _ops
except ImportError:
    _ops = None

GROUP_NORM_EPS = 64e-5  # llama.cpp's time-mix group norm


@dataclass(frozen=True)
class RwkvConfig:
    n_layer: int
    n_embd: int
    n_ff: int
    head_size: int
    norm_eps: float
    n_ctx_train: int
    rescale_every: int = 0  # rwkv6: the residual halves after every n-th block

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def from_gguf(cls, kv: dict, arch: str) -> RwkvConfig:
        return cls(n_layer=hparam(kv, arch, "block_count"), n_embd=hparam(kv, arch, "embedding_length"),
                   n_ff=hparam(kv, arch, "feed_forward_length"), head_size=hparam(kv, arch, "wkv.head_size"),
                   norm_eps=hparam(kv, arch, "attention.layer_norm_epsilon", 1e-5),
                   n_ctx_train=hparam(kv, arch, "context_length", 1 << 20),
                   rescale_every=hparam(kv, arch, "rescale_every_n_layers", 0))


class RwkvState:
    """One layer's recurrent state for one sequence: the last normed input of the time-mix and of the channel-mix
    (token shift) and the WKV matrices. A recurrence cannot step back: trim() of fewer tokens than it holds forgets
    them all (the caller re-evaluates its prefix)."""

    def __init__(self, n_embd: int, n_head: int, head_size: int):
        self.shift = np.zeros((2, n_embd), np.float32)
        self.wkv = np.zeros((n_head, head_size, head_size), np.float32)
        self.offset = 0

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        dropped = self.offset
        self.reset()
        return dropped

    def reset(self) -> None:
        self.shift[:] = 0
        self.wkv[:] = 0
        self.offset = 0


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """ggml_norm (mean and population variance over the last axis), scaled and shifted."""
    mean = x.mean(axis=-1, keepdims=True)
    d = x - mean
    var = np.einsum("...i,...i->...", d, d, dtype=np.float32)[..., None] / np.float32(x.shape[-1])
    return d / np.sqrt(var + np.float32(eps)) * weight + bias


def group_norm(x: np.ndarray, n_head: int, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    m = x.shape[0]
    return layer_norm(x.reshape(m, n_head, -1), 1.0, 0.0, GROUP_NORM_EPS).reshape(m, -1) * weight + bias


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def token_shift(h: np.ndarray, states: Sequence[RwkvState], spans: Sequence[tuple[int, int]], which: int
                ) -> np.ndarray:
    """Each row's previous row within its sequence (the state's for a sequence's first); the state then keeps the
    sequence's last row."""
    prev = np.empty_like(h)
    for (a, b), st in zip(spans, states):
        prev[a] = st.shift[which]
        prev[a + 1:b] = h[a:b - 1]
        st.shift[which] = h[b - 1]
    return prev


def wkv6(r: np.ndarray, k: np.ndarray, v: np.ndarray, w: np.ndarray, u: np.ndarray, state: np.ndarray
         ) -> np.ndarray:
    """RWKV-6's recurrence (ggml_rwkv_wkv6) over T tokens, per head h with S (head_size k, head_size v):
    y_t = r_t (S + diag(u) k_t v_t^T);  S <- diag(w_t) S + k_t v_t^T.  r, k, v, w: (T, H, N); u: (H, N); state
    (H, N, N) updated in place. Returns (T, H * N)."""
    t_len, n_head, n = r.shape
    out = np.empty((t_len, n_head, n), np.float32)
    if _ops is not None and hasattr(_ops, "wkv6"):
        _ops.wkv6(*(np.ascontiguousarray(a, np.float32) for a in (r, k, v, w, u)), state, out, t_len, n_head, n)
        return out.reshape(t_len, -1)
    for t in range(t_len):
        kv = k[t][:, :, None] * v[t][:, None, :]  # (H, N, N)
        out[t] = np.einsum("hi,hij->hj", r[t], state + u[:, :, None] * kv)
        state *= w[t][:, :, None]
        state += kv
    return out.reshape(t_len, -1)


def wkv7(r: np.ndarray, w: np.ndarray, k: np.ndarray, v: np.ndarray, a: np.ndarray, b: np.ndarray,
         state: np.ndarray) -> np.ndarray:
    """RWKV-7's recurrence (ggml_rwkv_wkv7), per head with S (head_size v, head_size k):
    S <- S diag(w_t) + v_t k_t^T + (S a_t) b_t^T;  y_t = S r_t.  All (T, H, N); state (H, N, N) in place."""
    t_len, n_head, n = r.shape
    out = np.empty((t_len, n_head, n), np.float32)
    if _ops is not None and hasattr(_ops, "wkv7"):
        _ops.wkv7(*(np.ascontiguousarray(x, np.float32) for x in (r, w, k, v, a, b)), state, out, t_len, n_head, n)
        return out.reshape(t_len, -1)
    for t in range(t_len):
        sa = np.einsum("hij,hj->hi", state, a[t])
        state *= w[t][:, None, :]
        state += v[t][:, :, None] * k[t][:, None, :] + sa[:, :, None] * b[t][:, None, :]
        out[t] = np.einsum("hij,hj->hi", state, r[t])
    return out.reshape(t_len, -1)


def _stacked(w: WeightLoader, name: str) -> list[Linear]:
    """The matrices of a 3-D GGUF tensor (rwkv6's time_mix_w2: 5 of them), one Linear each, zero-copy."""
    views = Weight.experts_from_gguf(w.gguf, name)
    linears = [w.build(v) for v in views]
    w.linears.extend(linears)
    return linears


class RwkvBlock:
    """What both versions share: the norms, the token shifts, the residuals; subclasses mix time and channels."""

    def __init__(self, cfg: RwkvConfig, w: WeightLoader, i: int):
        p = self.prefix = f"blk.{i}."
        self.cfg, self.index = cfg, i
        v = w.vector
        self.ln0 = (v("token_embd_norm.weight"), v("token_embd_norm.bias")) if i == 0 else None
        self.attn_norm = (v(p + "attn_norm.weight"), v(p + "attn_norm.bias"))
        self.ffn_norm = (v(p + "attn_norm_2.weight"), v(p + "attn_norm_2.bias"))
        self.ln_x = (v(p + "time_mix_ln.weight"), v(p + "time_mix_ln.bias"))
        self.receptance, self.key, self.value, self.output = (
            w.linear(p + f"time_mix_{n}.weight") for n in ("receptance", "key", "value", "output"))
        self.ffn_key, self.ffn_value = w.linear(p + "channel_mix_key.weight"), w.linear(p + "channel_mix_value.weight")
        self.ffn_lerp_k = v(p + "channel_mix_lerp_k.weight")

    def make_cache(self, n_ctx: int) -> RwkvState:
        return RwkvState(self.cfg.n_embd, self.cfg.n_head, self.cfg.head_size)

    def __call__(self, x: np.ndarray, states: Sequence[RwkvState], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        eps = self.cfg.norm_eps
        if self.ln0 is not None:
            x = layer_norm(x, *self.ln0, eps)
        h = layer_norm(x, *self.attn_norm, eps)
        x = x + self.time_mix(h, token_shift(h, states, spans, 0), states, spans)
        h = layer_norm(x, *self.ffn_norm, eps)
        x = x + self.channel_mix(h, token_shift(h, states, spans, 1))
        for (a, b), st in zip(spans, states):
            st.offset += b - a
        if self.cfg.rescale_every and (self.index + 1) % self.cfg.rescale_every == 0:
            x = x * np.float32(0.5)
        return x

    def wkv(self, states, spans, fn, rows: Sequence[np.ndarray], *consts: np.ndarray) -> np.ndarray:
        """The recurrence per sequence, each over its own state: `rows` are (M, n_embd) arrays, viewed per head."""
        n_head, n = self.cfg.n_head, self.cfg.head_size
        shaped = [a.reshape(a.shape[0], n_head, n) for a in rows]
        if len(spans) == 1:
            return fn(*shaped, *consts, states[0].wkv)
        return np.concatenate([fn(*(s[a:b] for s in shaped), *consts, st.wkv) for (a, b), st in zip(spans, states)])


class Rwkv6Block(RwkvBlock):
    def __init__(self, cfg: RwkvConfig, w: WeightLoader, i: int):
        super().__init__(cfg, w, i)
        p, v = self.prefix, w.vector
        self.gate = w.linear(p + "time_mix_gate.weight")
        self.ffn_receptance = w.linear(p + "channel_mix_receptance.weight")
        self.ffn_lerp_r = v(p + "channel_mix_lerp_r.weight")
        self.lerp_x = v(p + "time_mix_lerp_x.weight")
        if w.has(p + "time_mix_lerp_fused.weight"):  # (5, n_embd): w, k, v, r, g
            self.lerp = w.gguf.dequantize(p + "time_mix_lerp_fused.weight").reshape(5, -1)
        else:
            self.lerp = np.stack([v(p + f"time_mix_lerp_{n}.weight") for n in "wkvrg"])
        self.mix_w1 = w.linear(p + "time_mix_w1.weight")  # n_embd -> 5 x extra_dim
        self.mix_w2 = _stacked(w, p + "time_mix_w2.weight")  # 5 x (extra_dim -> n_embd)
        self.decay = v(p + "time_mix_decay.weight")
        self.decay_w1, self.decay_w2 = w.linear(p + "time_mix_decay_w1.weight"), w.linear(
            p + "time_mix_decay_w2.weight")
        self.first = w.gguf.dequantize(p + "time_mix_first.weight").reshape(cfg.n_head, cfg.head_size)

    def time_mix(self, h, prev, states, spans):
        m, sx = h.shape[0], prev - h
        lora = np.tanh(self.mix_w1(h + sx * self.lerp_x)).reshape(m, 5, -1)
        xw, xk, xv, xr, xg = (h + sx * (self.mix_w2[j](np.ascontiguousarray(lora[:, j])) + self.lerp[j])
                              for j in range(5))
        r, k, v = self.receptance(xr), self.key(xk), self.value(xv)
        g = silu(self.gate(xg))
        w = np.exp(-np.exp(self.decay + self.decay_w2(np.tanh(self.decay_w1(xw)))))
        y = self.wkv(states, spans, wkv6, (r, k, v, w), self.first)
        return self.output(group_norm(y, self.cfg.n_head, *self.ln_x) * g)

    def channel_mix(self, h, prev):
        sx = prev - h
        k = np.square(np.maximum(self.ffn_key(h + sx * self.ffn_lerp_k), 0))
        return sigmoid(self.ffn_receptance(h + sx * self.ffn_lerp_r)) * self.ffn_value(k)


class Rwkv7Block(RwkvBlock):
    def __init__(self, cfg: RwkvConfig, w: WeightLoader, i: int, scratch: dict):
        super().__init__(cfg, w, i)
        p, v = self.prefix, w.vector
        self.lerp = w.gguf.dequantize(p + "time_mix_lerp_fused.weight").reshape(6, -1)  # r, w, k, v, a, g
        self.w0, self.a0, self.v0 = v(p + "time_mix_w0.weight"), v(p + "time_mix_a0.weight"), v(
            p + "time_mix_v0.weight")
        self.w1, self.w2, self.a1, self.a2, self.v1, self.v2, self.g1, self.g2 = (
            w.linear(p + f"time_mix_{n}.weight") for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2"))
        self.k_k, self.k_a, self.r_k = (v(p + f"time_mix_{n}.weight") for n in ("k_k", "k_a", "r_k"))
        self.scratch = scratch  # the model's: layer 0 leaves its values there for the later layers of the call

    def time_mix(self, h, prev, states, spans):
        c, m, sx = self.cfg, h.shape[0], prev - h
        xr, xw, xk, xv, xa, xg = (h + sx * self.lerp[j] for j in range(6))
        r = self.receptance(xr)
        w = np.exp(np.float32(-0.606531) * sigmoid(self.w0 + self.w2(np.tanh(self.w1(xw)))))
        k, v = self.key(xk), self.value(xv)
        if self.index == 0:
            self.scratch["v_first"] = v
        else:  # the first layer's values as a residual
            v = v + (self.scratch["v_first"] - v) * sigmoid(self.v0 + self.v2(self.v1(xv)))
        g = self.g2(sigmoid(self.g1(xg)))
        a = sigmoid(self.a0 + self.a2(self.a1(xa)))
        kk = (k * self.k_k).reshape(m, c.n_head, c.head_size)
        kk = (kk / np.maximum(np.linalg.norm(kk, axis=-1, keepdims=True), np.float32(1e-12))).reshape(m, -1)
        ka = k * self.k_a
        k = k + (a * ka - ka)
        y = self.wkv(states, spans, wkv7, (r, w, k, v, -kk, kk * a))
        y = group_norm(y, c.n_head, *self.ln_x)
        rk = (k * r * self.r_k).reshape(m, c.n_head, c.head_size).sum(axis=-1, keepdims=True)
        y = y + (v.reshape(m, c.n_head, c.head_size) * rk).reshape(m, -1)
        return self.output(y * g)

    def channel_mix(self, h, prev):
        k = np.square(np.maximum(self.ffn_key(h + (prev - h) * self.ffn_lerp_k), 0))
        return self.ffn_value(k)


class RwkvModel(Model):
    """The shared skeleton with RWKV's LayerNorm (with bias) before the output matmul; the embedding's LayerNorm is
    block 0's first step. n_ctx only bounds the positions: the state does not grow with them."""

    def __init__(self, cfg: RwkvConfig, w: WeightLoader, blocks: list[RwkvBlock], n_ctx: int):
        super().__init__(cfg, Embedding(w.gguf_weight("token_embd.weight")), blocks, w.vector("output_norm.weight"),
                         w.linear("output.weight"), cfg.norm_eps, n_ctx, w.linears)
        self.output_norm_b = w.vector("output_norm.bias")

    def final_norm(self, x: np.ndarray) -> np.ndarray:
        return layer_norm(x, self.output_norm, self.output_norm_b, self.norm_eps)


def from_gguf(w: WeightLoader, n_ctx: int, version: int) -> Model:
    arch = f"rwkv{version}"
    cfg = RwkvConfig.from_gguf(w.gguf.kv, arch)
    if cfg.n_embd % cfg.head_size:
        raise ValueError(f"{arch}: embedding_length {cfg.n_embd} is not a multiple of wkv.head_size {cfg.head_size}")
    scratch: dict = {}
    blocks = [Rwkv6Block(cfg, w, i) if version == 6 else Rwkv7Block(cfg, w, i, scratch) for i in range(cfg.n_layer)]
    return RwkvModel(cfg, w, blocks, n_ctx)
