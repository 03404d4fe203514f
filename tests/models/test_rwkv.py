"""RWKV-6 / RWKV-7 on random-weight GGUFs with llama.cpp's tensor names and shapes: against llama.cpp, prefill over M
tokens against token-by-token, several sequences in one batch, the state as the cache."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf_writers import write_rwkv_model

from npulm.evaluate import divergence
from npulm.gguf import GGUFFile
from npulm.models import load_model, rwkv


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
