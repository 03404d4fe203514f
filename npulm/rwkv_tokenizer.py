"""The RWKV "world" tokenizer (GGUF `tokenizer.ggml.model = rwkv`), as llama.cpp's: the vocabulary entries are
escaped byte strings (\\t \\n \\r \\xHH \\\\), text is split greedily into the longest entry that matches at each
position (a byte no entry starts with becomes the unknown token), and a token decodes to its bytes. No BOS / EOS
unless the GGUF names them."""

from __future__ import annotations

import threading

from .gguf import GGUFError
from .tokenizer import CONTROL, NORMAL, UNKNOWN, Tokenizer, _id


def unescape(token: str) -> bytes:
    """llama.cpp's llama_unescape_rwkv_token."""
    out, chars, i = bytearray(), token, 0
    while i < len(chars):
        c = chars[i]
        if c == "\\" and i + 1 < len(chars):
            e = chars[i + 1]
            if e == "x" and i + 3 < len(chars):
                out.append(int(chars[i + 2:i + 4], 16))
                i += 4
                continue
            out += {"t": b"\t", "n": b"\n", "r": b"\r"}.get(e, e.encode())
            i += 2
            continue
        out += c.encode()
        i += 1
    return bytes(out)


class RwkvTokenizer(Tokenizer):
    def __init__(self, kv: dict):
        tokens = kv.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens:
            raise GGUFError("GGUF has no tokenizer.ggml.tokens")
        n = len(tokens)
        raw_types = kv.get("tokenizer.ggml.token_type")
        self.types = [NORMAL] * n if raw_types is None or len(raw_types) == 0 else list(map(int, raw_types))
        if len(self.types) < n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(self.types)} entries for {n} tokens")
        self.model, self.pre, self.tokens = "rwkv", "default", tokens
        self.bos_id, self.eos_id = _id(kv, "bos_token_id", None, n), _id(kv, "eos_token_id", None, n)
        self.unk_id, self.pad_id = _id(kv, "unknown_token_id", None, n), _id(kv, "padding_token_id", None, n)
        self.eot_id = self.eom_id = None
        self.add_bos = bool(kv.get("tokenizer.ggml.add_bos_token", False))
        self.add_eos = bool(kv.get("tokenizer.ggml.add_eos_token", False))
        self.add_space_prefix = self.escaped_spaces = False
        self.eog_ids = {self.eos_id} if self.eos_id is not None else set()
        self._bytes = [unescape(t) for t in tokens]
        self._index = {b: i for i, b in enumerate(self._bytes) if self.types[i] not in (CONTROL, UNKNOWN) and b}
        self._longest = max(map(len, self._index), default=1)
        self._pieces: dict[int, bytes] = {}
        self._lock = threading.Lock()

    def _text_ids(self, text: str, special: bool) -> list[int]:
        data, ids, pos = text.encode("utf-8"), [], 0
        index, unk = self._index, self.unk_id if self.unk_id is not None else 0
        while pos < len(data):
            for length in range(min(self._longest, len(data) - pos), 0, -1):
                tid = index.get(data[pos:pos + length])
                if tid is not None:
                    ids.append(tid)
                    pos += length
                    break
            else:
                ids.append(unk)
                pos += 1
        return ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        return [self._text_ids(t, special) for t in texts]

    def _piece(self, token_id: int, ty: int) -> bytes:
        return self._bytes[token_id]
