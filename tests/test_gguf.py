"""GGUF reader: metadata and tensors equal gguf's own reader; every type gguf can dequantize loads; malformed
files raise GGUFError naming the problem, never another exception, a hang or a giant allocation."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest
from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as T

from npulm.gguf import GGUFError, GGUFFile

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0, T.MXFP4]
DEQUANT_ONLY = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S,
                T.IQ1_M, T.IQ4_NL, T.IQ4_XS, T.NVFP4]


def _random_blocks(qtype: T, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes with every fp16 field kept finite (we flip exponent bits off where scales live)."""
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    raw[:, 1::2] &= 0x3B  # high bytes of any little-endian fp16 stay below the inf/nan exponent
    return raw


@pytest.fixture(scope="module")
def all_types_file(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("types") / "types.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_string("test.string", "héllo")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.strings", ["a", "bc", ""])
    w.add_float64("test.f64", 0.25)
    w.add_bool("test.bool", True)
    for qt in QUANTIZABLE:
        a = rng.standard_normal((4, 256)).astype(np.float32)
        if qt == T.F32:
            w.add_tensor(f"t.{qt.name}", a)
        elif qt == T.F16:
            w.add_tensor(f"t.{qt.name}", a.astype(np.float16))
        else:
            w.add_tensor(f"t.{qt.name}", gguf.quants.quantize(a, qt), raw_dtype=qt)
    for qt in DEQUANT_ONLY:
        w.add_tensor(f"t.{qt.name}", _random_blocks(qt, 4, 256, rng), raw_dtype=qt)
    w.add_tensor("t.I32", np.arange(12, dtype=np.int32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_and_tensors_equal_gguf_reader(all_types_file):
    ours, theirs = GGUFFile(all_types_file), gguf.GGUFReader(all_types_file)
    for name, field in theirs.fields.items():
        if name.startswith("GGUF."):
            continue
        mine = ours.kv[name]
        assert (mine.tolist() if isinstance(mine, np.ndarray) else mine) == field.contents(), name
    assert ours.kv["test.string"] == "héllo" and ours.kv["test.strings"] == ["a", "bc", ""]
    assert ours.kv["test.ints"].dtype == np.int32  # numeric arrays come as numpy arrays (compact)
    assert len(ours.tensors) == len(theirs.tensors)
    for t in theirs.tensors:
        mine = ours.tensors[t.name]
        assert mine.type == t.tensor_type and list(mine.shape) == [int(x) for x in t.shape]
        assert mine.offset == t.data_offset and mine.nbytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name), np.asarray(t.data))


@pytest.mark.parametrize("qtype", QUANTIZABLE + DEQUANT_ONLY, ids=lambda q: q.name)
def test_every_dequantizable_type_loads(all_types_file, qtype):
    ours, theirs = GGUFFile(all_types_file), gguf.GGUFReader(all_types_file)
    t = next(t for t in theirs.tensors if t.name == f"t.{qtype.name}")
    got = ours.dequantize(t.name)
    want = gguf.quants.dequantize(t.data, qtype)
    assert got.shape == (4, 256) and got.dtype == np.float32
    np.testing.assert_array_equal(got, want.reshape(4, 256))
    rows = ours.dequantize(t.name, rows=np.array([2, 0]))
    np.testing.assert_array_equal(rows, got[[2, 0]])


def test_raw_is_zero_copy(all_types_file):
    g = GGUFFile(all_types_file)
    a = g.raw("t.Q8_0")
    assert not a.flags.owndata and not a.flags.writeable


# --- malformed files ------------------------------------------------------------------------------------------

def _header(version=3, n_tensors=0, n_kv=0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


def _write(tmp_path, data: bytes):
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("data, message", [
    (b"", "too small"),
    (b"GGML" + bytes(40), "not a GGUF file"),
    (_header(version=1) + bytes(8), "unsupported GGUF version 1"),
    (_header(version=3 << 24) + bytes(8), "big-endian"),
    (_header(n_kv=10**15), "absurd counts"),
    (_header(n_tensors=10**15), "absurd counts"),
    (_header(n_kv=1) + struct.pack("<Q", 2**62) + b"k", "claims"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", 77) + bytes(8), "unknown value type 77"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 4, 2**60), "past the end"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 8, 2**60), "past the end"),
    (_header(n_kv=1) + struct.pack("<Q", 1) + b"k" + struct.pack("<IIQ", 9, 99, 1), "unknown element type"),
    (_header(n_kv=1) + struct.pack("<Q", 2) + b"\xff\xfe" + struct.pack("<I", 4) + bytes(4), "not valid UTF-8"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<I", 9) + bytes(64), "dimensions"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 32, 999, 0) + bytes(8),
     "unknown type id 999"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 2**40, 0, 0) + bytes(32),
     "outside the file"),
    (_header(n_tensors=1) + struct.pack("<Q", 1) + b"t" + struct.pack("<IQIQ", 1, 30, 8, 0) + bytes(32),
     "does not fit Q8_0"),
    (_header(n_kv=1) + _kv_string("general.alignment", "x"), "not a power of two"),
])
def test_malformed_files_raise_gguf_error(tmp_path, data, message):
    path = _write(tmp_path, data + bytes(16))  # room for the smallest key/value, so the count check passes
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    assert message in str(e.value)


def test_bad_alignment(tmp_path):
    k = b"general.alignment"
    data = _header(n_kv=1) + struct.pack("<Q", len(k)) + k + struct.pack("<II", 4, 24) + bytes(8)
    with pytest.raises(GGUFError, match="not a power of two"):
        GGUFFile(_write(tmp_path, data))


def test_every_truncation_of_a_real_file_raises_gguf_error(tiny_models, tmp_path):
    data = tiny_models["llama-q8_0"].read_bytes()
    g = GGUFFile(tiny_models["llama-q8_0"])
    end_of_header = g.data_offset
    cuts = sorted({*range(0, min(end_of_header, 4000), 7), end_of_header - 1, len(data) - 1, len(data) // 2})
    for cut in cuts:
        with pytest.raises(GGUFError):
            GGUFFile(_write(tmp_path, data[:cut]))


def test_random_corruption_never_crashes(tiny_models, tmp_path):
    data = bytearray(tiny_models["llama"].read_bytes())
    rng = np.random.default_rng(0)
    g = GGUFFile(tiny_models["llama"])
    for _ in range(300):
        bad = bytearray(data)
        for i in rng.integers(4, g.data_offset, 3):
            bad[i] = rng.integers(0, 256)
        try:
            GGUFFile(_write(tmp_path, bytes(bad)))
        except GGUFError:
            pass


def test_missing_file_and_tensor(tmp_path, tiny_models):
    with pytest.raises(GGUFError, match="cannot open"):
        GGUFFile(tmp_path / "nope.gguf")
    with pytest.raises(GGUFError, match="missing tensor 'nope'"):
        GGUFFile(tiny_models["llama"]).tensor("nope")


def test_deeply_nested_arrays_are_an_error_not_a_recursion(tmp_path):
    """Issue 14 item 1: arrays nested ~500 deep (a 6 KB file) raised RecursionError."""
    kv = struct.pack("<Q", 1) + b"a" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 500 + struct.pack("<IQ", 4, 0)
    with pytest.raises(GGUFError, match="nests arrays more than"):
        GGUFFile(_write(tmp_path, _header(n_kv=1) + kv + bytes(32)))


def test_nested_arrays_within_the_bound_parse(tmp_path):
    inner = struct.pack("<IQ", 4, 2) + struct.pack("<II", 7, 8)
    kv = struct.pack("<Q", 1) + b"a" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 2) + inner + inner
    g = GGUFFile(_write(tmp_path, _header(n_kv=1) + kv + bytes(32)))
    assert [list(x) for x in g.kv["a"]] == [[7, 8], [7, 8]]


def test_metadata_counts_are_bounded(tmp_path, monkeypatch):
    """Issue 14 item 9: 7M tiny key/value pairs parsed for 86 s; counts are now capped before any parsing."""
    import npulm.gguf as reader

    pairs = b"".join(struct.pack("<Q", 2) + b"k%d" % (i % 10) + struct.pack("<IB", 0, 1) for i in range(10))
    path = _write(tmp_path, _header(n_kv=10) + pairs + bytes(32))
    monkeypatch.setattr(reader, "MAX_METADATA_KEYS", 5)
    with pytest.raises(GGUFError, match="absurd counts"):
        GGUFFile(path)


def test_duplicate_metadata_key(tmp_path):
    data = _header(n_kv=2) + _kv_string("a", "x") + _kv_string("a", "y")
    with pytest.raises(GGUFError, match="duplicate metadata key 'a'"):
        GGUFFile(_write(tmp_path, data + bytes(32)))
