"""Hyper-parameters and tensor shapes are checked at load for every architecture: a bad file is a GGUFError naming
the key or tensor with what was expected and found, never a ZeroDivisionError / TypeError or a failure at the first
completion."""

from __future__ import annotations

import math

import pytest
from fuzzing import ARR, F32, I32, STR, U32, variant

from npulm.gguf import GGUFError, GGUFFile
from npulm.models import load_model


def _load(path):
    return load_model(GGUFFile(path), n_ctx=16)


@pytest.mark.parametrize("key, value, message", [
    ("llama.attention.head_count", (F32, math.inf), "llama.attention.head_count: expected an integer"),
    ("llama.attention.head_count_kv", (F32, 1.5), "llama.attention.head_count_kv: expected an integer"),
    ("llama.attention.head_count", (U32, 0), "llama.attention.head_count: expected an integer in 1..65536, found 0"),
    ("llama.block_count", (STR, "2"), "llama.block_count: expected an integer"),
    ("llama.embedding_length", (ARR, (I32, [64])), "llama.embedding_length: expected an integer"),
    ("llama.context_length", (U32, 2**32 - 1), "llama.context_length"),
    ("llama.attention.layer_norm_rms_epsilon", (F32, math.nan), "layer_norm_rms_epsilon: expected a number in"),
    ("llama.attention.layer_norm_rms_epsilon", (F32, 0.0), "layer_norm_rms_epsilon: expected a number in (0"),
    ("llama.rope.freq_base", (F32, -math.inf), "llama.rope.freq_base"),
    ("llama.attention.head_count_kv", (U32, 3), "head_count_kv = 3 does not divide attention.head_count = 4"),
    ("llama.rope.dimension_count", (U32, 17), "rope.dimension_count = 17"),
    ("llama.rope.dimension_count", (U32, 0), "llama.rope.dimension_count: expected an integer in 2..65536, found 0"),
    ("llama.embedding_length", None, "missing metadata key llama.embedding_length"),
])
def test_bad_hyper_parameters_name_the_key(tiny_models, tmp_path, key, value, message):
    path = variant(tiny_models["llama"], tmp_path / "bad.gguf", {key: value})
    with pytest.raises(GGUFError) as e:
        _load(path)
    assert message in str(e.value)


@pytest.mark.parametrize("arch, name, dims, expected", [
    ("llama", "blk.1.attn_q.weight", [64, 32], "[64, 64]"),
    ("llama", "blk.0.ffn_down.weight", [64, 128], "[128, 64]"),  # transposed: the same bytes, a wrong layout
    ("qwen2", "blk.0.attn_k.bias", [16], "[32]"),
    ("gemma3", "blk.2.attn_q_norm.weight", [32], "[16]"),
    ("llama", "output_norm.weight", [32], "[64]"),
    ("gemma3", "blk.1.attn_k_norm.weight", [32], "[16]"),  # over all KV heads: olmoe's layout, not gemma3's
])
def test_tensor_shapes_are_checked_at_load(tiny_models, tmp_path, arch, name, dims, expected):
    from fuzzing import serialize, spec_from_file

    spec = spec_from_file(tiny_models[arch])
    t = next(t for t in spec.tensors if t[0] == name)
    t[1] = dims
    t[3] = t[3][:4 * math.prod(dims)]  # the data matches the new (wrong) shape, so only the shape check can tell
    path = tmp_path / "bad.gguf"
    path.write_bytes(serialize(spec))
    with pytest.raises(GGUFError) as e:
        _load(path)
    assert f"tensor {name!r} has shape {dims}, expected {expected}" in str(e.value)


@pytest.mark.parametrize("arch, changes, message", [
    # found by the 100,000-case fuzz run: both failed while the blocks were built (ZeroDivisionError, IndexError)
    ("llama", {"llama.attention.head_count": (U32, 128), "llama.attention.head_count_kv": (U32, 128),
               "llama.attention.key_length": None}, "leaves a head size of 0 for embedding_length = 64"),
    ("gemma3", {"gemma3.attention.sliding_window_pattern": (ARR, (I32, [1]))},
     "sliding_window_pattern has 1 per-layer flags for block_count = 3"),
])
def test_relations_are_checked_before_blocks_are_built(tiny_models, tmp_path, arch, changes, message):
    with pytest.raises(GGUFError, match=message):
        _load(variant(tiny_models[arch], tmp_path / "bad.gguf", changes))


def test_biases_come_together(tiny_models, tmp_path):
    from fuzzing import serialize, spec_from_file

    spec = spec_from_file(tiny_models["qwen2"])
    spec.tensors = [t for t in spec.tensors if t[0] != "blk.1.attn_k.bias"]
    path = tmp_path / "bad.gguf"
    path.write_bytes(serialize(spec))
    with pytest.raises(GGUFError, match="missing tensor 'blk.1.attn_k.bias'"):
        _load(path)


def test_valid_files_still_load(tiny_models):
    for name in ("llama", "qwen2", "gemma3", "llama-q4_0"):
        assert _load(tiny_models[name]).n_vocab > 0
