"""The quantization math of the NPU pipelines against float64 references."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from npulm.linear import Weight
from npulm.npu import quant as qm

RNG = np.random.default_rng(1234)


def outlier_activations(m: int, k: int, seed: int = 0, n_out: int = 4, gain: float = 20.0) -> np.ndarray:
    """N(0, 1) rows with a few channels `gain` times larger, like real LLM linear inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    x[:, rng.choice(k, n_out, replace=False)] *= gain
    return x


# --- rotations --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 64, 512, 1024])
def test_hadamard_orthogonal_and_symmetric(n):
    h = qm.hadamard(n)
    assert np.abs(h @ h.T - np.eye(n)).max() < 1e-12
    assert np.array_equal(h, h.T)
    raw = qm.hadamard(n, normalize=False)
    assert set(np.unique(raw)) <= {-1.0, 1.0}
    assert np.array_equal(raw @ raw.T, n * np.eye(n))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(ValueError):
        qm.hadamard(576)
    with pytest.raises(ValueError):
        qm.fwht(np.ones((2, 576)))


@pytest.mark.parametrize("n", [2, 8, 32, 64, 128, 512, 1024, 2048])
def test_fwht_equals_dense_product(n):
    x = RNG.standard_normal((5, n))
    ref = x @ qm.hadamard(n)
    assert np.abs(qm.fwht(x) - ref).max() < 1e-12 * np.sqrt(n) * np.abs(x).max()
    assert np.allclose(qm.fwht(x, normalize=False), x @ qm.hadamard(n, normalize=False), rtol=0, atol=1e-10)
    y32 = qm.fwht(x.astype(np.float32))
    assert y32.dtype == np.float32 and np.abs(y32 - ref).max() < 1e-5 * np.abs(ref).max()


def test_block_sizes():
    assert qm.largest_pow2_divisor(576) == 64
    assert qm.largest_pow2_divisor(640) == 128
    assert qm.largest_pow2_divisor(1536) == 512
    assert qm.largest_pow2_divisor(2048) == 512
    assert qm.largest_pow2_divisor(2048, cap=4096) == 2048
    assert [qm.next_pow2(k) for k in (1, 576, 1024, 1536, 2880)] == [1, 1024, 1024, 2048, 4096]


def test_random_signs_seeded():
    a, b, c = qm.random_signs(100, 7), qm.random_signs(100, 7), qm.random_signs(100, 8)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert set(np.unique(a)) == {-1.0, 1.0}


@pytest.mark.parametrize("k,kind", [(576, "block"), (1536, "block"), (640, "block"), (576, "pad"), (1536, "pad")])
def test_rotation_preserves_products(k, kind):
    rot = qm.block_hadamard_rotation(k, seed=3) if kind == "block" else qm.padded_hadamard_rotation(k, seed=3)
    r = rot.matrix()
    assert np.abs(r @ r.T - np.eye(rot.k_pad)).max() < 1e-12
    x, w = RNG.standard_normal((6, k)), RNG.standard_normal((9, k))
    xr, wr = qm.rotate_activation(x, rot), qm.rotate_weight(w, rot)
    pad = np.zeros((6, rot.k_pad))
    pad[:, :k] = x
    assert np.abs(xr - pad @ r).max() < 1e-12
    ref = x @ w.T
    assert np.abs(xr @ wr.T - ref).max() < 1e-12 * np.abs(ref).max() * 10
    raw = qm.rotate_activation(x, rot, normalize=False) @ qm.rotate_weight(w, rot, normalize=False).T
    assert np.abs(raw / rot.gain - ref).max() < 1e-12 * np.abs(ref).max() * 10


def test_rotation_flattens_outliers():
    x = outlier_activations(32, 576)
    crest = lambda a: np.median(np.abs(a).max(axis=1) / np.sqrt((a * a).mean(axis=1)))  # noqa: E731
    rotated = qm.rotate_activation(x, qm.block_hadamard_rotation(576))
    assert crest(x) > 8 and crest(rotated) < 0.6 * crest(x)


# --- activation quantizers and the int8 split -------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(8, None), (4, None), (8, 32), (4, 32)])
def test_quantize_rows_error_bound(bits, group):
    x = outlier_activations(16, 576)
    q, s = qm.quantize_rows(x, bits, group)
    assert q.dtype == np.int8 and s.shape == (16, 1 if group is None else 576 // group)
    assert np.abs(q).max() <= qm.qmax(bits)
    err = np.abs(qm.dequantize_codes(q, s) - x)
    bound = np.repeat(s, 576 // s.shape[1], axis=1) / 2
    assert np.all(err <= bound * (1 + 1e-12))
    assert np.abs(q).max(axis=1).min() == qm.qmax(bits)  # absmax lands on the clamp


def test_quantize_rows_rounds_half_to_even_and_zero_rows():
    q, s = qm.quantize_rows(np.array([[127.0, 2.5, 3.5, -2.5, 0.5], [0, 0, 0, 0, 0]]), 8)
    assert s[0, 0] == 1.0 and q[0].tolist() == [127, 2, 4, -2, 0]
    assert s[1, 0] == 0.0 and not q[1].any()


def test_int8_split_exact_over_whole_range():
    v = np.arange(-128, 128, dtype=np.int8)[None]
    hi, lo = qm.split_int8_to_int4(v)
    assert hi.min() >= -8 and hi.max() <= 7 and lo.min() >= -8 and lo.max() <= 7
    assert np.array_equal(16 * hi.astype(int) + lo + qm.INT8_SPLIT_SHIFT, v.astype(int))
    assert np.array_equal(qm.merge_int4_halves(hi, lo), v)
    hi0, lo0 = qm.split_int8_to_int4(np.arange(-128, 120, dtype=np.int8)[None], shift=0)
    assert np.array_equal(16 * hi0.astype(int) + lo0, np.arange(-128, 120)[None])
    with pytest.raises(ValueError):
        qm.split_int8_to_int4(np.array([[120]], np.int8), shift=0)  # 120 = 16*7 + 8: lo would be 8


def test_split_partials_equal_int8_partials():
    xq = RNG.integers(-128, 128, (7, 256)).astype(np.int8)
    codes = RNG.integers(-8, 8, (11, 256)).astype(np.int8)
    for g in (1, 8):
        split = qm.split_partials(xq, codes, g)
        assert np.array_equal(split, qm.block_partials(xq, codes, g))
    hi, lo = qm.split_int8_to_int4(xq)
    per_pass = qm.block_partials(hi, codes, 8)
    assert np.abs(per_pass).max() <= 64 * 32  # each INT4 pass over a 32-block stays far inside int16
    assert qm.max_int16_chunk() == 511


# --- weight quantizers ------------------------------------------------------------------------------------------------

def _within_half_step(w, codes, scale):
    err = np.abs(qm.dequantize_codes(codes, scale) - w)
    return np.all(err <= np.broadcast_to(np.repeat(scale, w.shape[1] // scale.shape[1], axis=1), w.shape) / 2
                  * (1 + 1e-12))


@pytest.mark.parametrize("bits", [8, 4])
def test_absmax_weight_quantizers(bits):
    w = RNG.standard_normal((48, 256)) * np.exp(RNG.standard_normal((48, 1)))
    c, s = qm.quantize_per_tensor(w, bits)
    assert s.shape == (1, 1) and np.isclose(s[0, 0], np.abs(w).max() / qm.qmax(bits)) and _within_half_step(w, c, s)
    c, s = qm.quantize_per_channel(w, bits)
    assert s.shape == (48, 1) and np.allclose(s[:, 0], np.abs(w).max(axis=1) / qm.qmax(bits))
    assert _within_half_step(w, c, s)
    c, s = qm.quantize_groupwise(w, 32, bits)
    assert s.shape == (48, 8) and _within_half_step(w, c, s) and np.abs(c).max() <= qm.qmax(bits)


def test_mse_clip_never_worse_than_absmax():
    w = RNG.standard_t(3, (64, 512))  # heavy tails: clipping pays
    ca, sa = qm.quantize_per_channel(w, 4)
    cm, sm = qm.quantize_per_channel(w, 4, clip="mse")
    ea = ((qm.dequantize_codes(ca, sa) - w) ** 2).sum(axis=1)
    em = ((qm.dequantize_codes(cm, sm) - w) ** 2).sum(axis=1)
    assert np.all(em <= ea * (1 + 1e-12)) and em.sum() < 0.8 * ea.sum()
    assert np.all(sm <= sa * (1 + 1e-12))
    cg, sg = qm.quantize_groupwise(w, 64, 4, clip="mse")
    assert sg.shape == (64, 8) and ((qm.dequantize_codes(cg, sg) - w) ** 2).sum() < em.sum()


def test_kl_clip_per_tensor_int4():
    w = RNG.standard_normal((128, 512))
    w[0, 0] = 40.0  # one outlier: absmax scale would waste the int4 grid
    t = qm.kl_clip(w, 4)
    assert 0 < t < 0.5 * 40.0
    c, s = qm.quantize_per_tensor(w, 4, clip="kl")
    assert np.isclose(s[0, 0], t / 7) and np.abs(c).max() == 7
    err_kl = np.linalg.norm(qm.dequantize_codes(c, s) - w)
    ca, sa = qm.quantize_per_tensor(w, 4)
    assert err_kl < 0.5 * np.linalg.norm(qm.dequantize_codes(ca, sa) - w)
    assert qm.kl_clip(np.zeros((4, 4))) == 0.0


# --- GGUF-native codes ------------------------------------------------------------------------------------------------

# byte offsets of the fp16 fields of each block type (random bytes there may be inf/nan; replace them)
_F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q2_K: [80, 82],
               T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.IQ4_NL: [0], T.IQ4_XS: [0]}


def random_blocks(t, rows: int, n_in: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    block, size = GGML_QUANT_SIZES[t]
    nb = n_in // block
    raw = rng.integers(0, 256, (rows, nb * size), dtype=np.uint8)
    b = raw.reshape(rows, nb, size)
    for at in _F16_FIELDS[t]:  # finite fp16 over a wide exponent range, both signs
        v = rng.standard_normal((rows, nb)) * 10.0 ** rng.uniform(-6, 3, (rows, nb))
        b[..., at:at + 2] = v.astype(np.float16).view(np.uint8).reshape(rows, nb, 2)
    return raw


def _assert_exact(gc: qm.GGUFCodes, ref: np.ndarray):
    got = gc.dequantize()
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got, ref)  # equal float32 values (only the sign of a zero may differ)
    assert gc.codes.min() >= gc.code_min and gc.codes.max() <= gc.code_max


@pytest.mark.parametrize("t", qm.GGUF_EXACT_TYPES, ids=lambda t: t.name)
def test_gguf_codes_exact_on_random_blocks(t):
    raw = random_blocks(t, 9, 512, seed=int(t))
    gc = qm.gguf_codes_from_raw(raw, t)
    _assert_exact(gc, quants.dequantize(raw, t))
    assert gc.scale.shape == (9, 512 // gc.block)
    assert np.array_equal(gc.scale.astype(np.float32).astype(np.float64), gc.scale)  # scales exact in float32
    assert (gc.offset is None) == (t in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q3_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS))
    assert gc.bits == (4 if gc.code_max <= 7 and gc.code_min >= -8 else 8)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_gguf_codes_exact_on_quantized_weights(t):
    w = (RNG.standard_normal((16, 256)) * 0.02).astype(np.float32)
    raw = quants.quantize(w, t)
    gc = qm.gguf_codes(Weight("w", t, 16, 256, raw))
    _assert_exact(gc, quants.dequantize(raw, t))
    if t == T.Q4_1:  # w = d*q + m with q = code + 8: scale = d, offset = m + 8d
        b = raw.reshape(16, 8, 20)
        d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        assert np.array_equal(gc.scale, d) and np.array_equal(gc.offset, m + 8 * d)


def test_gguf_codes_rejects_unsupported_type():
    with pytest.raises(ValueError, match="no exact integer codes"):
        qm.gguf_codes_from_raw(np.zeros((1, 34), np.uint8), T.F16)


def test_gguf_codes_on_smollm2_q4_1():
    from npulm.assets import model_path
    from npulm.gguf import GGUFFile

    g = GGUFFile(model_path("smollm2-135m"))
    w = Weight.from_gguf(g, "blk.0.attn_q.weight")
    gc = qm.gguf_codes(w)
    _assert_exact(gc, w.dequantize())
    assert gc.bits == 4 and gc.codes.shape == (576, 576) and gc.offset.shape == (576, 18)


def test_gguf_codes_on_gemma3_k_quants():
    from npulm.assets import model_path
    from npulm.gguf import GGUFFile

    g = GGUFFile(model_path("gemma3-270m"))
    seen = set()
    for name, t in g.tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2 and t.type not in seen:
            seen.add(t.type)
            w = Weight.from_gguf(g, name)
            _assert_exact(qm.gguf_codes(w), w.dequantize())
    assert {T.Q5_0, T.Q4_K, T.Q6_K, T.Q8_0} <= seen


# --- matmul math ------------------------------------------------------------------------------------------------------

def test_expand_rows_gives_block_partials_in_one_product():
    xq = RNG.integers(-127, 128, (3, 96)).astype(np.int8)
    codes = RNG.integers(-8, 8, (5, 96)).astype(np.int8)
    one = qm.expand_rows_by_group(xq, 3).astype(np.int64) @ codes.T.astype(np.int64)
    assert np.array_equal(one.reshape(3, 3, 5), qm.block_partials(xq, codes, 3))
    assert np.array_equal(qm.block_partials(xq, codes, 3).sum(axis=1), xq.astype(np.int64) @ codes.T)


@pytest.mark.parametrize("ga,gw,offset", [(1, 1, False), (1, 1, False), (1, 6, True), (6, 6, True), (6, 3, False),
                                          (3, 6, True)])
def test_quantized_matmul_equals_dequantized_product(ga, gw, offset):
    m, n, k = 4, 7, 192
    xq = RNG.integers(-127, 128, (m, k)).astype(np.int8)
    sx = RNG.uniform(0.01, 1, (m, ga))
    codes = RNG.integers(-8, 8, (n, k)).astype(np.int8)
    sw = RNG.uniform(0.01, 1, (n, gw))
    off = RNG.standard_normal((n, gw)) if offset else None
    xf = qm.dequantize_codes(xq, sx)
    ref = xf @ qm.dequantize_codes(codes, sw, off).T
    xs = qm.group_sums(xf, gw) if offset else None
    for partials in (None, qm.block_partials):
        y = qm.quantized_matmul(xq, sx, codes, sw, off, xs, partials)
        assert np.abs(y - ref).max() < 1e-12 * np.abs(ref).max()
    per_tensor = qm.quantized_matmul(xq, sx[:, :1], codes, sw[:1, :1])
    assert np.abs(per_tensor - (xq * sx[:, :1]) @ (codes * sw[0, 0]).T.astype(float)).max() < 1e-12 * k


@pytest.mark.parametrize("t", [T.Q4_1, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_gguf_matmul(t):
    raw = random_blocks(t, 24, 512, seed=5)
    gc = qm.gguf_codes_from_raw(raw, t)
    w = quants.dequantize(raw, t).astype(np.float64)
    x = outlier_activations(8, 512)
    ref = x @ w.T
    y = qm.gguf_matmul(x, gc)
    # exactly: quantized x times the weight's centred part + float x times the offsets
    xq, sx = qm.quantize_rows(x, 8)
    centred = qm.dequantize_codes(gc.codes, gc.scale)
    expect = qm.dequantize_codes(xq, sx) @ centred.T
    if gc.offset is not None:
        expect += x @ np.repeat(gc.offset, gc.block, axis=1).T
    assert np.abs(y - expect).max() < 1e-12 * np.abs(ref).max()
    # the only error is x's rounding (<= sx/2 per element) times the centred weight
    assert np.all(np.abs(y - ref) <= sx / 2 * np.abs(centred).sum(axis=1)[None] * (1 + 1e-9))
    literal = qm.gguf_matmul(x, gc, literal=True)  # exact integer per-block sums, as the NPU returns them
    assert np.abs(literal - y).max() < 1e-13 * np.abs(ref).max()
    if gc.bits == 4:
        assert np.array_equal(qm.gguf_matmul(x, gc, split_int4=True), literal)
        blockwise = qm.gguf_matmul(x, gc, act_group=gc.block)
        assert qm.relative_error(blockwise, ref) < qm.relative_error(y, ref)  # outliers confined to their blocks
    else:
        with pytest.raises(ValueError):
            qm.gguf_matmul(x, gc, split_int4=True)


# --- quantized matmul -------------------------------------------------------------------------------------------------


def test_quantized_matmul_row_chunks_agree(monkeypatch):
    xq = RNG.integers(-127, 128, (37, 128)).astype(np.int8)
    sx = RNG.uniform(0.1, 1, (37, 4))
    codes = RNG.integers(-8, 8, (9, 128)).astype(np.int8)
    sw, off = RNG.uniform(0.1, 1, (9, 4)), RNG.standard_normal((9, 4))
    xs = RNG.standard_normal((37, 4))
    whole = qm.quantized_matmul(xq, sx, codes, sw, off, xs, qm.block_partials)
    assert np.abs(qm.quantized_matmul(xq, sx, codes, sw, off, xs) - whole).max() < 1e-12 * np.abs(whole).max()
    monkeypatch.setattr(qm, "_CHUNK_ELEMENTS", 4 * 9 * 5)  # 5 rows per chunk
    assert np.array_equal(qm.quantized_matmul(xq, sx, codes, sw, off, xs, qm.block_partials), whole)
    assert np.array_equal(qm.quantized_matmul(xq, sx, codes, sw, off, xs, qm.split_partials), whole)
