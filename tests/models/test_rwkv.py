"""RWKV-6 / RWKV-7 on random-weight GGUFs with llama.cpp's tensor names and shapes: against llama.cpp, prefill over M
tokens against token-by-token, several sequences in one batch, the state as the cache."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import tiny_vocab
from gguf.constants import GGMLQuantizationType as T

from npulm.evaluate import divergence
from npulm.gguf import GGUFFile
from npulm.models import load_model, rwkv

E, FF, HS, LORA, N_LAYER = 128, 256, 64, 32, 2  # llama.cpp's SIMD WKV-7 steps 64 floats (AVX-512): heads of 64


def write_rwkv_model(path: Path, version: int, qtype: T = T.F32, seed: int = 0, n_ctx: int = 256,
                     zero: tuple[str, ...] = (), world_vocab: bool = False, n_embd: int = E, n_ff: int = FF,
                     n_layer: int = N_LAYER) -> Path:
    """Random weights with llama.cpp's tensor names and shapes (zero: tensors whose name contains one of these are
    written as zeros)."""
    E, FF, N_LAYER = n_embd, n_ff, n_layer  # noqa: N806  the module's names, overridable
    rng = np.random.default_rng(seed)
    arch = f"rwkv{version}"
    tokens, scores, types = world_vocab_tokens() if world_vocab else tiny_vocab()
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_context_length(n_ctx)
    w.add_embedding_length(E)
    w.add_feed_forward_length(FF)
    w.add_head_count(0)
    w.add_wkv_head_size(HS)
    w.add_layer_norm_eps(1e-5)
    w.add_token_shift_count(2)
    if version == 6:
        w.add_time_mix_extra_dim(LORA)
        w.add_time_decay_extra_dim(LORA)
        w.add_rescale_every_n_layers(0)
    else:
        w.add_decay_lora_rank(LORA)
        w.add_iclr_lora_rank(LORA)
        w.add_value_residual_mix_lora_rank(LORA)
        w.add_gate_lora_rank(LORA)
    w.add_tokenizer_model("rwkv" if world_vocab else "llama")
    w.add_token_list(tokens)
    w.add_token_types(types)
    if not world_vocab:
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)

    def mat(name, *shape, scale=0.1):
        a = (rng.standard_normal(shape) * scale).astype(np.float32) * (not any(z in name for z in zero))
        if qtype == T.F32:
            w.add_tensor(name, a)
        elif qtype == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def vec(name, *shape, around=0.0, scale=0.1):
        w.add_tensor(name, (around + scale * rng.standard_normal(shape)).astype(np.float32))

    def norm(name):
        vec(name + ".weight", E, around=1.0)
        vec(name + ".bias", E)

    mat("token_embd.weight", V, E, scale=0.5)
    norm("token_embd_norm")
    norm("output_norm")
    mat("output.weight", V, E)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        norm(p + "attn_norm")
        norm(p + "attn_norm_2")
        norm(p + "time_mix_ln")
        for n in ("key", "value", "receptance", "output"):
            mat(p + f"time_mix_{n}.weight", E, E)
        mat(p + "channel_mix_key.weight", FF, E)
        mat(p + "channel_mix_value.weight", E, FF)
        vec(p + "channel_mix_lerp_k.weight", 1, 1, E, around=0.5, scale=0.2)
        if version == 6:
            mat(p + "time_mix_gate.weight", E, E)
            mat(p + "channel_mix_receptance.weight", E, E)
            vec(p + "channel_mix_lerp_r.weight", 1, 1, E, around=0.5, scale=0.2)
            vec(p + "time_mix_lerp_x.weight", 1, 1, E, around=0.5, scale=0.2)
            vec(p + "time_mix_lerp_fused.weight", 5, 1, 1, E, around=0.5, scale=0.2)
            mat(p + "time_mix_w1.weight", 5 * LORA, E)
            mat(p + "time_mix_w2.weight", 5, E, LORA)
            vec(p + "time_mix_first.weight", E // HS, HS, scale=0.3)
            vec(p + "time_mix_decay.weight", E, around=-1.0, scale=0.5)
            mat(p + "time_mix_decay_w1.weight", LORA, E)
            mat(p + "time_mix_decay_w2.weight", E, LORA)
        else:
            vec(p + "time_mix_lerp_fused.weight", 6, 1, 1, E, around=0.5, scale=0.2)
            for n, around in (("w", -0.5), ("a", 0.0), ("v", 0.0)):
                vec(p + f"time_mix_{n}0.weight", E, around=around, scale=0.5)
            for n in ("w", "a", "v", "g"):
                mat(p + f"time_mix_{n}1.weight", LORA, E)
                mat(p + f"time_mix_{n}2.weight", E, LORA)
            vec(p + "time_mix_k_k.weight", E, around=1.0, scale=0.2)
            vec(p + "time_mix_k_a.weight", E, around=1.0, scale=0.2)
            vec(p + "time_mix_r_k.weight", E, scale=0.3)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def world_vocab_tokens() -> tuple[list[str], list[float], list[int]]:
    """A world-style vocabulary: "<s>", every byte (escaped as the world vocabulary spells them), words."""
    tokens = ["<s>"] + [{9: "\\t", 10: "\\n", 13: "\\r", 92: "\\\\"}.get(b, chr(b) if 32 <= b < 127 else f"\\x{b:02x}")
                        for b in range(256)]
    tokens += ["he", "hel", "hello", " w", " world", "th", " the", "wor", "\\n\\n", "\\xe4\\xbd\\xa0", ", "]
    return tokens, [], [3] + [1] * (len(tokens) - 1)


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(5, 297, n - 1).tolist()


THRESHOLDS = {T.F32: (1e-3, 0.99), T.F16: (1e-3, 0.99), T.Q8_0: (0.01, 0.95), T.Q4_0: (0.01, 0.95)}


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", list(THRESHOLDS), ids=lambda t: t.name)
@pytest.mark.parametrize("version", [6, 7])
def test_logits_match_llama_cpp(tmp_path, version, qtype):
    pytest.importorskip("llama_cpp")
    from npulm.reference import LlamaCpp

    path = write_rwkv_model(tmp_path / f"rwkv{version}-{qtype.name}.gguf", version, qtype)
    tokens = random_tokens(256)
    ref = LlamaCpp(str(path), n_ctx=256).logits(tokens)
    model = load_model(GGUFFile(path), 256)
    got = model.forward(tokens, model.make_cache(), logits_from=0)
    d = divergence(ref, got)
    kl, top1 = THRESHOLDS[qtype]
    print(f"\nrwkv{version} {qtype.name}: mean KL {d.mean_kl:.2e}, top-1 {100 * d.top1_rate:.1f} %")
    assert d.mean_kl <= kl and d.top1_rate >= top1


@pytest.mark.parametrize("version", [6, 7])
def test_prefill_equals_token_by_token(tmp_path, version):
    model = load_model(GGUFFile(write_rwkv_model(tmp_path / "m.gguf", version, n_ctx=64)), 64)
    tokens = random_tokens(24, seed=1)
    batched = model.forward(tokens, model.make_cache(), logits_from=0)
    cache = model.make_cache()
    stepwise = np.concatenate([model.forward([t], cache) for t in tokens])
    np.testing.assert_allclose(stepwise, batched, rtol=0, atol=1e-4 * np.abs(batched).max())
    split = model.make_cache()  # uneven prefill pieces carry the state across calls
    a, b = model.forward(tokens[:9], split, logits_from=0), model.forward(tokens[9:], split, logits_from=0)
    np.testing.assert_allclose(np.concatenate([a, b]), batched, rtol=0, atol=1e-4 * np.abs(batched).max())
    assert split[0].offset == 24


@pytest.mark.parametrize("version", [6, 7])
def test_sequences_in_one_batch_keep_their_own_state(tmp_path, version):
    model = load_model(GGUFFile(write_rwkv_model(tmp_path / "m.gguf", version, n_ctx=64)), 64)
    x, y = random_tokens(10, seed=2), random_tokens(7, seed=3)
    cx, cy = model.make_cache(), model.make_cache()
    model.forward(x[:4], cx)
    got = model.forward_batch([x[4:], y], [cx, cy], logits_from=0)
    want_x = model.forward(x, model.make_cache(), logits_from=0)[4:]
    want_y = model.forward(y, model.make_cache(), logits_from=0)
    for g, want in ((got[0], want_x), (got[1], want_y)):
        np.testing.assert_allclose(g, want, rtol=0, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("version", [6, 7])
def test_numpy_recurrence_equals_the_compiled_one(version, monkeypatch):
    if rwkv._ops is None or not hasattr(rwkv._ops, f"wkv{version}"):
        pytest.skip("the C extension is not built")
    rng = np.random.default_rng(4)
    t_len, h, n = 9, 3, 16
    args = [rng.standard_normal((t_len, h, n)).astype(np.float32) for _ in range(6)]
    if version == 6:
        r, k, v, w, u = args[0], args[1], args[2], np.exp(-np.exp(args[3])), args[4][0]
        call = (rwkv.wkv6, r, k, v, w, u)
    else:
        r, w, k, v, kk = args[0], np.exp(-0.6 * (1 / (1 + np.exp(-args[1])))), args[2], args[3], args[4]
        kk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
        call = (rwkv.wkv7, r, w, k, v, -kk, kk * 0.5)
    s0 = rng.standard_normal((h, n, n)).astype(np.float32)
    s_c, s_np = s0.copy(), s0.copy()
    got = call[0](*call[1:], s_c)
    monkeypatch.setattr(rwkv, "_ops", None)
    want = call[0](*call[1:], s_np)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s_c, s_np, rtol=1e-5, atol=1e-5)


def test_session_rolls_back_by_recomputing(tmp_path):
    """A recurrent state cannot step back: a Session that keeps a shorter prefix re-evaluates it."""
    from npulm.generate import Session

    model = load_model(GGUFFile(write_rwkv_model(tmp_path / "m.gguf", 7, n_ctx=64)), 64)
    s = Session(model)
    prompt = random_tokens(12, seed=5)
    s.prefill(prompt + [7, 8, 9])
    got = s.prefill(prompt)  # the common prefix is 11 tokens: the state holds 15
    want = model.forward(prompt, model.make_cache())[-1]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert s.tokens == prompt and s.cache[0].offset == len(prompt)
