"""Checks every architecture gets at load, declared as tables: the hyper-parameters read from GGUF metadata (type and
range, by key) and the shapes of the tensors (by GGUF name, as expressions over the model's config). A file that
breaks one fails at load with a GGUFError naming the key or tensor, what was expected and what was found, instead of
a ZeroDivisionError at load or a reshape error at the first completion.

A new architecture gets the checks by reading its hyper-parameters with `base.hparam` and by naming its config
fields as the table does (n_embd, n_head, n_head_kv, head_dim, head_dim_v, n_ff, n_vocab, n_expert, ...). Rows for
new tensors or keys go here; a tensor whose expression names a field the config lacks is not checked.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..gguf import GGUFError, GGUFFile


@dataclass(frozen=True)
class Int:
    lo: int
    hi: int


@dataclass(frozen=True)
class Float:
    lo: float
    hi: float
    lo_open: bool = False  # lo itself excluded (e.g. an epsilon must be > 0)


@dataclass(frozen=True)
class Flags:
    """A per-layer array of 0/1 flags, or an Int (e.g. sliding_window_pattern: a period or a flag per layer)."""
    period: Int


BIG = 1 << 20
# `{arch}.<key>` -> rule. Keys not listed here must still be finite numbers when numeric.
HPARAMS: dict[str, Int | Float | Flags] = {
    "block_count": Int(1, 4096),
    "context_length": Int(1, 1 << 24),
    "embedding_length": Int(1, BIG),
    "feed_forward_length": Int(1, 4 * BIG),
    "expert_feed_forward_length": Int(1, 4 * BIG),
    "expert_shared_feed_forward_length": Int(1, 4 * BIG),
    "expert_count": Int(0, 1 << 16),
    "expert_used_count": Int(0, 1 << 16),
    "expert_shared_count": Int(0, 1 << 16),
    "attention.head_count": Int(1, 1 << 16),
    "attention.head_count_kv": Int(1, 1 << 16),
    "attention.key_length": Int(1, 1 << 16),
    "attention.value_length": Int(1, 1 << 16),
    "attention.layer_norm_rms_epsilon": Float(0.0, 1.0, lo_open=True),
    "attention.layer_norm_epsilon": Float(0.0, 1.0, lo_open=True),
    "attention.sliding_window": Int(0, 1 << 24),
    "attention.sliding_window_pattern": Flags(Int(0, 4096)),
    "attention.logit_softcapping": Float(0.0, 1e6),
    "final_logit_softcapping": Float(0.0, 1e6),
    "rope.dimension_count": Int(2, 1 << 16),
    "rope.freq_base": Float(0.0, 1e12, lo_open=True),
    "rope.freq_base_swa": Float(0.0, 1e12, lo_open=True),
    "rope.scaling.factor": Float(0.0, 1e6),
    "rope.scale_linear": Float(0.0, 1e6),
    "vocab_size": Int(1, 1 << 24),
}


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"an array of {len(value)} {value.dtype}"
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    return f"{value!r} ({type(value).__name__})"


def check_hparam(name: str, key: str, value: Any) -> Any:
    """`value` of metadata `name` (= `{arch}.{key}`) if it obeys HPARAMS, else GGUFError naming the key."""
    rule = HPARAMS.get(key)
    if isinstance(rule, Flags):
        if isinstance(value, (np.ndarray, list)):
            if not all(isinstance(v, (bool, int, np.bool_, np.integer)) and 0 <= v <= 1 for v in value):
                raise GGUFError(f"metadata {name}: expected an integer or per-layer 0/1 flags, found "
                                f"{_describe(value)}")
            return value
        rule = rule.period
    if isinstance(rule, Int):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise GGUFError(f"metadata {name}: expected an integer in {rule.lo}..{rule.hi}, found {_describe(value)}")
        if not rule.lo <= value <= rule.hi:
            raise GGUFError(f"metadata {name}: expected an integer in {rule.lo}..{rule.hi}, found {value}")
        return int(value)
    if isinstance(rule, Float):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise GGUFError(f"metadata {name}: expected a number, found {_describe(value)}")
        low_ok = value > rule.lo if rule.lo_open else value >= rule.lo
        if not (math.isfinite(value) and low_ok and value <= rule.hi):
            raise GGUFError(f"metadata {name}: expected a number in {'(' if rule.lo_open else '['}{rule.lo:g}, "
                            f"{rule.hi:g}], found {value!r}")
        return float(value)
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        raise GGUFError(f"metadata {name}: expected a finite number, found {value!r}")
    return value


# --- tensor shapes ----------------------------------------------------------------------------------------------
# GGUF tensor name (with "blk.N." removed) -> expected shape in ggml order (ne0 = the input / row dimension first),
# each dimension a product of config fields and integers; a list gives alternatives.
TENSOR_SHAPES: dict[str, tuple[str, ...] | list[tuple[str, ...]]] = {
    "token_embd.weight": ("n_embd", "n_vocab"),
    "output.weight": ("n_embd", "n_vocab"),
    "output_norm.weight": ("n_embd",),
    "attn_norm.weight": ("n_embd",),
    "ffn_norm.weight": ("n_embd",),
    "post_attention_norm.weight": ("n_embd",),
    "post_ffw_norm.weight": ("n_embd",),
    "attn_q.weight": ("n_embd", "n_head*head_dim"),
    "attn_k.weight": ("n_embd", "n_head_kv*head_dim"),
    "attn_v.weight": ("n_embd", "n_head_kv*head_dim_v"),
    "attn_output.weight": ("n_head*head_dim_v", "n_embd"),
    "attn_q.bias": ("n_head*head_dim",),
    "attn_k.bias": ("n_head_kv*head_dim",),
    "attn_v.bias": ("n_head_kv*head_dim_v",),
    "attn_q_norm.weight": [("head_dim",), ("n_head*head_dim",)],  # per head (qwen3, gemma3) or all heads (olmoe)
    "attn_k_norm.weight": [("head_dim",), ("n_head_kv*head_dim",)],
    "ffn_gate.weight": ("n_embd", "n_ff"),
    "ffn_up.weight": ("n_embd", "n_ff"),
    "ffn_down.weight": ("n_ff", "n_embd"),
    "ffn_gate_inp.weight": ("n_embd", "n_expert"),
    "ffn_gate_exps.weight": ("n_embd", "n_ff_exp", "n_expert"),
    "ffn_up_exps.weight": ("n_embd", "n_ff_exp", "n_expert"),
    "ffn_down_exps.weight": ("n_ff_exp", "n_embd", "n_expert"),
    # rwkv6 / rwkv7
    **dict.fromkeys(["attn_norm.bias", "attn_norm_2.weight", "attn_norm_2.bias", "output_norm.bias",
                     "token_embd_norm.weight", "token_embd_norm.bias", "time_mix_ln.weight", "time_mix_ln.bias"],
                    ("n_embd",)),
    **dict.fromkeys(["time_mix_key.weight", "time_mix_value.weight", "time_mix_receptance.weight",
                     "time_mix_output.weight", "time_mix_gate.weight", "channel_mix_receptance.weight"],
                    ("n_embd", "n_embd")),
    **dict.fromkeys(["time_mix_lerp_x.weight", "channel_mix_lerp_k.weight", "channel_mix_lerp_r.weight"],
                    ("n_embd", "1", "1")),
    "channel_mix_key.weight": ("n_embd", "n_ff"),
    "channel_mix_value.weight": ("n_ff", "n_embd"),
}
# Rows an architecture narrows (its block reads only one of the alternatives).
ARCH_TENSOR_SHAPES: dict[str, dict[str, tuple[str, ...] | list[tuple[str, ...]]]] = {
    "gemma3": {"attn_q_norm.weight": ("head_dim",), "attn_k_norm.weight": ("head_dim",)},
}
# Optional tensors that come together or not at all, per block.
TENSOR_GROUPS: list[tuple[str, ...]] = [("attn_q.bias", "attn_k.bias", "attn_v.bias")]
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_FALLBACK = {"head_dim_v": "head_dim"}  # configs without the field use the other


def _field(config: Any, name: str) -> int | None:
    value = getattr(config, name, None)
    if value is None and name in _FALLBACK:
        value = getattr(config, _FALLBACK[name], None)
    return int(value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else None


def _dim(config: Any, expr: str) -> int | None:
    out = 1
    for factor in expr.split("*"):
        v = int(factor) if factor.isdigit() else _field(config, factor)
        if v is None:
            return None
        out *= v
    return out


def check_config(config: Any) -> None:
    """Relations between hyper-parameters that every attention architecture needs."""
    n_head, n_head_kv = _field(config, "n_head"), _field(config, "n_head_kv")
    if n_head and n_head_kv and n_head % n_head_kv:
        raise GGUFError(f"metadata attention.head_count_kv = {n_head_kv} does not divide attention.head_count = "
                        f"{n_head} (grouped-query attention shares each KV head among a whole number of heads)")
    n_rot, head_dim = _field(config, "n_rot"), _field(config, "head_dim")
    if head_dim is not None and head_dim < 1:
        raise GGUFError(f"metadata attention.head_count = {n_head} leaves a head size of {head_dim} for "
                        f"embedding_length = {_field(config, 'n_embd')} (and no attention.key_length)")
    n_layer, swa = _field(config, "n_layer"), getattr(config, "swa_layers", None)
    if n_layer is not None and swa is not None and len(swa) < n_layer:
        raise GGUFError(f"metadata attention.sliding_window_pattern has {len(swa)} per-layer flags for "
                        f"block_count = {n_layer}")
    if n_rot is not None and head_dim and (n_rot > head_dim or n_rot % 2):
        raise GGUFError(f"metadata rope.dimension_count = {n_rot}: expected an even number <= the head size "
                        f"{head_dim}")


def check_tensor_shapes(gguf: GGUFFile, config: Any, n_vocab: int | None = None) -> None:
    """Every tensor of TENSOR_SHAPES the file has must have the shape its config implies (GGUFError naming it)."""
    check_config(config)
    table = {**TENSOR_SHAPES, **ARCH_TENSOR_SHAPES.get(str(gguf.kv.get("general.architecture")), {})}
    n_layer = _field(config, "n_layer")
    for group in TENSOR_GROUPS:
        for i in range(n_layer or 0):
            have = [f"blk.{i}.{t}" in gguf.tensors for t in group]
            if any(have) and not all(have):
                missing = [f"blk.{i}.{t}" for t, h in zip(group, have) if not h]
                raise GGUFError(f"{gguf.path}: missing tensor {missing[0]!r} (blk.{i} has some of "
                                f"{', '.join(group)}, which come together)")
    for name, info in gguf.tensors.items():
        m = _BLOCK.match(name)
        if m and n_layer is not None and int(m.group(1)) >= n_layer:
            continue  # tensors of blocks past block_count are not loaded (e.g. a draft model's extra layers)
        expected = table.get(name[m.end():] if m else name)
        if expected is None:
            continue
        shapes = []
        for alternative in expected if isinstance(expected, list) else [expected]:
            dims = [n_vocab if e == "n_vocab" else _dim(config, e) for e in alternative]
            if any(d is None for d in dims):
                break  # the config does not have what this row needs: not checked
            shapes.append((dims, alternative))
        else:
            if all(list(info.shape) != dims for dims, _ in shapes):
                said = " or ".join(f"{dims} ({', '.join(names)})" for dims, names in shapes)
                raise GGUFError(f"{gguf.path}: tensor {name!r} has shape {list(info.shape)}, expected {said} "
                                f"from the metadata")
