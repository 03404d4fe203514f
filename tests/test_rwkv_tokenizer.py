"""The RWKV world tokenizer against llama.cpp's on a GGUF written here with an escaped world-style vocabulary."""

from __future__ import annotations

import pytest
from gguf_writers import write_rwkv_model

from npulm.gguf import GGUFFile
from npulm.rwkv_tokenizer import unescape
from npulm.vocab import load_tokenizer

TEXTS = ["hello world", "Hello\tworld\n\nthe end", "你好, the world", "weird \\ backslash \x01 byte", "", "   "]


def test_unescape():
    assert unescape("\\n\\t\\r") == b"\n\t\r"
    assert unescape("\\xe4\\xbd\\xa0") == "你".encode()
    assert unescape("a\\\\b") == b"a\\b" and unescape("plain") == b"plain"


def test_longest_match_and_round_trip(tmp_path):
    tok = load_tokenizer(GGUFFile(write_rwkv_model(tmp_path / "v.gguf", 7, n_ctx=64, world_vocab=True)).kv)
    assert tok.model == "rwkv" and tok.bos_id is None
    ids = tok.encode("hello world")
    assert [tok.token_to_bytes(i) for i in ids] == [b"hello", b" world"]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.oracle
def test_matches_llama_cpp(tmp_path):
    pytest.importorskip("llama_cpp")
    from npulm.reference import LlamaCpp

    path = write_rwkv_model(tmp_path / "v.gguf", 7, n_ctx=64, world_vocab=True)
    tok, ref = load_tokenizer(GGUFFile(path).kv), LlamaCpp(str(path), n_ctx=64)
    for text in TEXTS:
        assert tok.encode(text) == ref.tokenize(text, add_bos=True), text
