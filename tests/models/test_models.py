"""Every architecture against an independent float64 reference forward written here with per-position loops
(no KV cache, no batching; keys and values rounded to float16 as the cache stores them), and batched prefill
against token-by-token decode."""

from __future__ import annotations

import math

import numpy as np
import pytest

from npulm.evaluate import divergence
from npulm.gguf import GGUFFile
from npulm.models import load_model
from npulm.placement import Placement


def _rope(v: np.ndarray, pos: int, base: float, neox: bool) -> np.ndarray:
    d = len(v)
    out = v.copy()
    for i in range(d // 2):
        theta = pos * base ** (-2.0 * i / d)
        a, b = (i, i + d // 2) if neox else (2 * i, 2 * i + 1)
        out[a] = v[a] * math.cos(theta) - v[b] * math.sin(theta)
        out[b] = v[a] * math.sin(theta) + v[b] * math.cos(theta)
    return out


def _norm(v: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return v / np.sqrt(np.mean(v * v, axis=-1, keepdims=True) + eps) * w


def reference_logits(path, tokens: list[int]) -> np.ndarray:
    g = GGUFFile(path)
    arch, kv = g.architecture, g.kv
    def W(n):
        return g.dequantize(n).astype(np.float64)
    def has(n):
        return n in g.tensors
    L, H, Hkv = kv[f"{arch}.block_count"], kv[f"{arch}.attention.head_count"], kv[f"{arch}.attention.head_count_kv"]
    d, eps = kv[f"{arch}.attention.key_length"], kv[f"{arch}.attention.layer_norm_rms_epsilon"]
    n_embd = kv[f"{arch}.embedding_length"]
    gemma, neox = arch == "gemma3", arch in ("qwen2", "gemma3")
    window = kv.get(f"{arch}.attention.sliding_window", 0)
    pattern = kv.get(f"{arch}.attention.sliding_window_pattern", 6)
    x = W("token_embd.weight")[tokens] * (math.sqrt(n_embd) if gemma else 1.0)
    T = len(tokens)
    for layer in range(L):
        p = f"blk.{layer}."
        local = gemma and layer % pattern < pattern - 1
        base = 10000.0 if local else kv[f"{arch}.rope.freq_base"]
        h = _norm(x, W(p + "attn_norm.weight"), eps)
        q, k, v = (h @ W(p + f"attn_{n}.weight").T for n in "qkv")
        if has(p + "attn_q.bias"):
            q, k, v = q + W(p + "attn_q.bias"), k + W(p + "attn_k.bias"), v + W(p + "attn_v.bias")
        q, k, v = q.reshape(T, H, d), k.reshape(T, Hkv, d), v.reshape(T, Hkv, d)
        if gemma:
            q, k = _norm(q, W(p + "attn_q_norm.weight"), eps), _norm(k, W(p + "attn_k_norm.weight"), eps)
        q = np.array([[_rope(q[t, i], t, base, neox) for i in range(H)] for t in range(T)])
        k = np.array([[_rope(k[t, i], t, base, neox) for i in range(Hkv)] for t in range(T)])
        k, v = (a.astype(np.float16).astype(np.float64) for a in (k, v))  # the KV cache holds float16
        att = np.zeros((T, H, d))
        for t in range(T):
            for i in range(H):
                j = i // (H // Hkv)
                visible = [s for s in range(t + 1) if not (local and t - s >= window)]
                sc = np.array([q[t, i] @ k[s, j] for s in visible]) / math.sqrt(d)
                pr = np.exp(sc - sc.max())
                pr /= pr.sum()
                att[t, i] = sum(pr[n] * v[s, j] for n, s in enumerate(visible))
        o = att.reshape(T, H * d) @ W(p + "attn_output.weight").T
        x = x + (_norm(o, W(p + "post_attention_norm.weight"), eps) if gemma else o)
        h = _norm(x, W(p + "ffn_norm.weight"), eps)
        gate, up = h @ W(p + "ffn_gate.weight").T, h @ W(p + "ffn_up.weight").T
        act = (0.5 * gate * (1 + np.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) if gemma
               else gate / (1 + np.exp(-gate)))
        f = (act * up) @ W(p + "ffn_down.weight").T
        x = x + (_norm(f, W(p + "post_ffw_norm.weight"), eps) if gemma else f)
    x = _norm(x, W("output_norm.weight"), eps)
    return x @ W("output.weight" if has("output.weight") else "token_embd.weight").T


TOKENS = [1, 270, 291, 273, 273, 276, 290, 261, 284, 276, 279, 273, 265, 290, 296, 7, 100, 290]  # 18 > window 8


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "llama-q8_0", "llama-q4_0"])
def test_forward_matches_float64_reference(tiny_models, name):
    """The model math, on the dequantized-weight reference path (cpu-ref)."""
    model = load_model(GGUFFile(tiny_models[name]), n_ctx=32, placement=Placement(default="cpu-ref"))
    got = model.forward(TOKENS, model.make_cache(), logits_from=0)
    ref = reference_logits(tiny_models[name], TOKENS)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-4 * np.abs(ref).max())
    d = divergence(ref, got)
    assert d.mean_kl < 1e-8 and d.top1_rate == 1.0


@pytest.mark.parametrize("name", ["llama-q8_0", "llama-q4_0"])
def test_default_cpu_kernels_stay_close_to_reference(tiny_models, name):
    """The default CPU path quantizes activations to 8 bits inside its dot products, as llama.cpp does."""
    model = load_model(GGUFFile(tiny_models[name]), n_ctx=32)
    got = model.forward(TOKENS, model.make_cache(), logits_from=0)
    d = divergence(reference_logits(tiny_models[name], TOKENS), got)
    assert d.mean_kl < 1e-2 and d.top1_rate >= 0.8  # llama.cpp itself: ~1e-3 KL on random Q8_0 weights


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3"])
def test_prefill_equals_token_by_token(tiny_models, name):
    g = GGUFFile(tiny_models[name])
    model = load_model(g, 32)
    batched = model.forward(TOKENS, model.make_cache(), logits_from=0)
    cache = model.make_cache()
    stepwise = np.concatenate([model.forward([t], cache) for t in TOKENS])
    np.testing.assert_allclose(batched, stepwise, rtol=0, atol=1e-4 * np.abs(batched).max())
    cache = model.make_cache()  # two uneven prefill batches
    a, b = model.forward(TOKENS[:7], cache, logits_from=0), model.forward(TOKENS[7:], cache, logits_from=0)
    np.testing.assert_allclose(np.concatenate([a, b]), batched, rtol=0, atol=1e-4 * np.abs(batched).max())


def test_context_overflow_and_bad_token(tiny_models):
    model = load_model(GGUFFile(tiny_models["llama"]), n_ctx=8)
    with pytest.raises(ValueError, match="context overflow"):
        model.forward(list(range(1, 10)), model.make_cache())
    with pytest.raises(ValueError, match="token id out of range"):
        model.forward([10_000], model.make_cache())


def test_unsupported_architecture(tmp_path):
    import gguf

    from npulm.gguf import GGUFError

    w = gguf.GGUFWriter(str(tmp_path / "x.gguf"), "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFError, match="architecture 'mamba' is not supported"):
        load_model(GGUFFile(tmp_path / "x.gguf"), 8)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_prefill_in_query_chunks(tiny_models, name, monkeypatch):
    from npulm.models import blocks, cache

    # float weights and a float32 cache: 8-bit activations or float16 keys would turn a last-bit difference of the
    # summation order into a whole rounding step
    monkeypatch.setattr(cache, "KV_DTYPE", np.float32)
    g = GGUFFile(tiny_models[name])
    model = load_model(g, 32, Placement(default="cpu-ref"))
    whole = model.forward(TOKENS, model.make_cache(), logits_from=0)
    monkeypatch.setattr(blocks, "ATTN_CHUNK", 5)  # 18 tokens in chunks of 5, across the sliding window of 8
    chunked = model.forward(TOKENS, model.make_cache(), logits_from=0)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-5 * np.abs(whole).max())
