"""The tokenizer of a GGUF vocabulary, by `tokenizer.ggml.model`: the RWKV world tokenizer (npulm.rwkv_tokenizer) for
"rwkv", npulm.tokenizer's for the others. Here, above both, so that neither imports the other back."""

from __future__ import annotations

from .rwkv_tokenizer import RwkvTokenizer
from .tokenizer import Tokenizer


def load_tokenizer(kv: dict) -> Tokenizer:
    """Build from a GGUF metadata dict (`GGUFFile(path).kv`)."""
    if kv.get("tokenizer.ggml.model") == "rwkv":
        return RwkvTokenizer(kv)
    return Tokenizer.from_gguf(kv)
