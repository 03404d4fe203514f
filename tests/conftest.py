"""Shared fixtures: tiny GGUF models written with gguf.GGUFWriter (a few hundred KB, random weights)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


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
        a = (rng.standard_normal((n_out, n_in)) * scale).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, a)
        elif qtype == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

    def experts(name: str, n_out: int, n_in: int, scale: float = weight_scale) -> None:
        a = (rng.standard_normal((n_expert, n_out, n_in)) * scale).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, a)
        elif qtype == T.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)

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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per architecture (F32) plus quantized llama variants."""
    d = tmp_path_factory.mktemp("tiny")
    out = {arch: write_tiny_model(d / f"{arch}.gguf", arch, n_layer=3 if arch == "gemma3" else 2)
           for arch in ("llama", "qwen2", "gemma3")}
    out["llama-q8_0"] = write_tiny_model(d / "llama-q8_0.gguf", "llama", T.Q8_0)
    out["llama-q4_0"] = write_tiny_model(d / "llama-q4_0.gguf", "llama", T.Q4_0, tied=False)
    return out
