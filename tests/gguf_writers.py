"""GGUF files with random weights and the real tensor names of each architecture, written with gguf.GGUFWriter (a few
hundred KB): the tests' models (conftest's fixtures), and the families' benchmark models."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as T

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def add_matrix(w: gguf.GGUFWriter, name: str, a: np.ndarray, qtype: T) -> None:
    """A matrix (or a stack of them) in the file's weight type."""
    a = a.astype(np.float32)
    if qtype == T.F32:
        w.add_tensor(name, a)
    elif qtype == T.F16:
        w.add_tensor(name, a.astype(np.float16))
    else:
        w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)


def tiny_vocab() -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary: control tokens, 256 byte-fallback tokens, letters and a few words."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [2, 3, 3, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    words = ["▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "▁th", "▁the", "he", "▁a", "in", "▁in", "er", "on"]
    tokens += words
    types += [1] * len(words)
    scores = [0.0] * 261 + [-float(i) for i in range(len(words))]
    return tokens, scores, types


def write_tiny_model(path: Path, arch: str = "llama", qtype: T = T.F32, n_layer: int = 2, n_embd: int = 64,
                     n_head: int = 4, n_head_kv: int = 2, head_dim: int = 16, n_ff: int = 128, n_ctx: int = 64,
                     seed: int = 0, tied: bool = True, window: int = 8, n_expert: int = 0, n_expert_used: int = 0,
                     weight_scale: float = 0.15, output_scale: float = 0.15) -> Path:
    """Random weights with the architecture's real tensor names; n_expert > 0 writes a mixture of experts (the
    3-D ffn_*_exps tensors and the ffn_gate_inp router) instead of the MLP."""
    rng = np.random.default_rng(seed)
    tokens, scores, types = tiny_vocab()
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    if n_expert:
        w.add_expert_count(n_expert)
        w.add_expert_used_count(n_expert_used)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(n_ff)
    if arch == "gemma3":
        w.add_sliding_window(window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", 3)  # layers 0, 1 local, 2 global
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    w.add_chat_template(CHATML)

    def mat(name: str, n_out: int, n_in: int, scale: float = weight_scale) -> None:
        add_matrix(w, name, rng.standard_normal((n_out, n_in)) * scale, qtype)

    def experts(name: str, n_out: int, n_in: int, scale: float = weight_scale) -> None:
        add_matrix(w, name, rng.standard_normal((n_expert, n_out, n_in)) * scale, qtype)

    def vec(name: str, n: int, around: float = 1.0) -> None:
        w.add_tensor(name, (around + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", n_vocab, n_embd, 0.5)
    vec("output_norm.weight", n_embd)
    if not tied:
        mat("output.weight", n_vocab, n_embd, output_scale)
    q_dim, kv_dim = n_head * head_dim, n_head_kv * head_dim
    for i in range(n_layer):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", n_embd)
        vec(p + "ffn_norm.weight", n_embd)
        mat(p + "attn_q.weight", q_dim, n_embd)
        mat(p + "attn_k.weight", kv_dim, n_embd)
        mat(p + "attn_v.weight", kv_dim, n_embd)
        mat(p + "attn_output.weight", n_embd, q_dim)
        if n_expert:
            w.add_tensor(p + "ffn_gate_inp.weight", rng.standard_normal((n_expert, n_embd)).astype(np.float32))
            experts(p + "ffn_gate_exps.weight", n_ff, n_embd)
            experts(p + "ffn_up_exps.weight", n_ff, n_embd)
            experts(p + "ffn_down_exps.weight", n_embd, n_ff)
        else:
            mat(p + "ffn_gate.weight", n_ff, n_embd)
            mat(p + "ffn_up.weight", n_ff, n_embd)
            mat(p + "ffn_down.weight", n_embd, n_ff)
        if arch in ("qwen3", "qwen3moe"):  # per head
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
        if arch == "olmoe":  # over all heads
            vec(p + "attn_q_norm.weight", q_dim)
            vec(p + "attn_k_norm.weight", kv_dim)
        if arch == "qwen2":
            for n, d in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                vec(p + f"attn_{n}.bias", d, 0.0)
        if arch == "gemma3":
            vec(p + "attn_q_norm.weight", head_dim)
            vec(p + "attn_k_norm.weight", head_dim)
            vec(p + "post_attention_norm.weight", n_embd)
            vec(p + "post_ffw_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


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
        add_matrix(w, name, rng.standard_normal(shape) * scale * (not any(z in name for z in zero)), qtype)

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


def write_dequantized_copy(src: Path, dst: Path) -> None:
    """The same model with every tensor stored as F32 (its quantized weights dequantized): llama.cpp then runs the
    same weights with float matmuls, without rounding its activations to 8 bits."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        w.add_key_value(name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        w.add_tensor(t.name, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
                     .reshape([int(n) for n in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
