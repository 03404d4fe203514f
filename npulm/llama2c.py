"""llama2.c checkpoints (`model.bin`) and tokenizers (`tokenizer.bin`), run through the llama blocks.

Checkpoint formats, as karpathy/llama2.c's export.py writes them (all little-endian):
  legacy (run.c):  7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len; a negative
                   vocab_size means a separate classifier), then float32 tensors: token embedding, attention norms,
                   wq, wk, wv, wo, ffn norms, w1, w2, w3, final norm, RoPE cos / sin tables (unused), classifier.
  v1:              uint32 magic "ak42", int32 version 1, the 7 int32, uint8 shared-classifier flag, zero padding to
                   256 bytes, then float32: attention norms, ffn norms, final norm, token embedding, wq, wk, wv,
                   wo, w1, w2, w3, classifier.
  v2 (Q8_0):       as v1 with version 2 and an int32 group size after the flag; float32 norms (attention, ffn,
                   final), then per matrix (token embedding, wq, wk, wv, wo, w1, w2, w3, classifier) its int8 values
                   and then its float32 scales, one per group.
Matrices are PyTorch's (out, in), the layout of a GGUF weight. The float tensors load as zero-copy views; v2's
int8 groups are dequantized once to float32 (exactly q * s, as runq.c reads them). The loader names every tensor
as GGUF does (token_embd.weight, blk.N.attn_q.weight, ...) so the llama module builds the model unchanged.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType

from .linear import Linear, Weight
from .models.base import Model
from .models.llama import LlamaConfig, build
from .placement import Placement

MAGIC = 0x616B3432  # "ak42"
HEADER_BYTES = 256  # v1 / v2 header, padded


class Llama2cError(ValueError):
    """A llama2.c checkpoint or tokenizer is malformed or of an unknown version."""


@dataclass(frozen=True)
class Llama2cHeader:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int  # 0 = legacy
    group_size: int = 0  # v2

    def config(self) -> LlamaConfig:
        head_dim = self.dim // self.n_heads
        return LlamaConfig(n_layer=self.n_layers, n_embd=self.dim, n_head=self.n_heads, n_head_kv=self.n_kv_heads,
                           head_dim=head_dim, n_ff=self.hidden_dim, n_ctx_train=self.seq_len, norm_eps=1e-5,
                           rope_base=10000.0, rope_scale=1.0, n_rot=head_dim, rope_neox=False)


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether a file looks like a llama2.c checkpoint (not a GGUF; a header with a plausible shape)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        return False
    if len(head) < 28 or head[:4] == b"GGUF":
        return False
    try:
        _parse_header(head + b"\0" * (HEADER_BYTES - len(head)), os.path.getsize(path), str(path))
    except Llama2cError:
        return False
    return True


def _parse_header(buf: bytes, size: int, path: str) -> Llama2cHeader:
    magic, version = struct.unpack_from("<Ii", buf, 0)
    if magic == MAGIC:
        if version not in (1, 2):
            raise Llama2cError(f"{path}: llama2.c checkpoint version {version} is not supported (legacy, 1, 2 load)")
        dims = struct.unpack_from("<7i", buf, 8)
        shared = bool(buf[36])
        group = struct.unpack_from("<i", buf, 37)[0] if version == 2 else 0
        if version == 2 and group <= 0:
            raise Llama2cError(f"{path}: v2 checkpoint with group size {group}")
    else:
        version, dims = 0, struct.unpack_from("<7i", buf, 0)
        shared, group = dims[5] > 0, 0
        dims = (*dims[:5], abs(dims[5]), dims[6])
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = dims
    if (min(dims) <= 0 or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2 or max(dims) > 1 << 24
            or dim * vocab > size):
        raise Llama2cError(f"{path}: not a llama2.c checkpoint (header {list(dims)})")
    return Llama2cHeader(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len, shared, version, group)


class Checkpoint:
    """A llama2.c model.bin: its header and its tensors under GGUF names, (n_out, n_in) float32."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with open(self.path, "rb") as f:
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:
            raise Llama2cError(f"{self.path}: cannot open: {e}") from e
        size = len(self._mmap)
        if size < 28:
            raise Llama2cError(f"{self.path}: file too small for a llama2.c header ({size} bytes)")
        self.header = h = _parse_header(bytes(self._mmap[:HEADER_BYTES]).ljust(HEADER_BYTES, b"\0"), size,
                                        self.path)
        self._off = 28 if h.version == 0 else HEADER_BYTES
        self.tensors: dict[str, np.ndarray] = {}
        kv_dim = h.n_kv_heads * (h.dim // h.n_heads)
        L = h.n_layers
        mats = {"attn_q": (h.dim, h.dim), "attn_k": (kv_dim, h.dim), "attn_v": (kv_dim, h.dim),
                "attn_output": (h.dim, h.dim), "ffn_gate": (h.hidden_dim, h.dim), "ffn_down": (h.dim, h.hidden_dim),
                "ffn_up": (h.hidden_dim, h.dim)}  # llama2.c's w1, w2, w3
        embd = ("token_embd", (h.vocab_size, h.dim))
        if h.version == 0:
            self._float(*embd)
            self._float_layers("attn_norm", (h.dim,))
            for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
                self._float_layers(n, mats[n])
            self._float_layers("ffn_norm", (h.dim,))
            for n in ("ffn_gate", "ffn_down", "ffn_up"):
                self._float_layers(n, mats[n])
            self._float("output_norm", (h.dim,))
            self._off += 2 * h.seq_len * (h.dim // h.n_heads // 2) * 4  # RoPE tables: recomputed by the model
            if not h.shared_classifier:
                self._float("output", (h.vocab_size, h.dim))
        elif h.version == 1:
            self._float_layers("attn_norm", (h.dim,))
            self._float_layers("ffn_norm", (h.dim,))
            self._float("output_norm", (h.dim,))
            self._float(*embd)
            for n, shape in mats.items():
                self._float_layers(n, shape)
            if not h.shared_classifier:
                self._float("output", (h.vocab_size, h.dim))
        else:
            self._float_layers("attn_norm", (h.dim,))
            self._float_layers("ffn_norm", (h.dim,))
            self._float("output_norm", (h.dim,))
            self._q80(*embd)
            for n, shape in mats.items():
                for i in range(L):
                    self._q80(f"blk.{i}.{n}", shape)
            if not h.shared_classifier:
                self._q80("output", (h.vocab_size, h.dim))
        if self._off != size:
            raise Llama2cError(f"{self.path}: {size} bytes, but the header's shapes (version {h.version}) need "
                               f"{self._off}")

    def _take(self, dtype: type, shape: tuple[int, ...], what: str) -> np.ndarray:
        n = int(np.prod(shape))
        nbytes = n * np.dtype(dtype).itemsize
        if self._off + nbytes > len(self._mmap):
            raise Llama2cError(f"{self.path}: truncated in {what} (needs {self._off + nbytes} bytes, file has "
                               f"{len(self._mmap)})")
        a = np.frombuffer(self._mmap, dtype, n, self._off).reshape(shape)
        self._off += nbytes
        return a

    def _float(self, name: str, shape: tuple[int, ...]) -> None:
        self.tensors[name + ".weight"] = self._take(np.float32, shape, name)

    def _float_layers(self, name: str, shape: tuple[int, ...]) -> None:
        for i in range(self.header.n_layers):
            self._float(f"blk.{i}.{name}", shape)

    def _q80(self, name: str, shape: tuple[int, ...]) -> None:
        gs = self.header.group_size
        n = int(np.prod(shape))
        if n % gs:
            raise Llama2cError(f"{self.path}: {name} has {n} values, not a multiple of the group size {gs}")
        q = self._take(np.int8, (n // gs, gs), name + " values")
        s = self._take(np.float32, (n // gs, 1), name + " scales")
        self.tensors[name + ".weight"] = (q * s).reshape(shape)

    def weight(self, name: str) -> Weight:
        a = self.tensors[name]
        return Weight(name, GGMLQuantizationType.F32, a.shape[0], a.shape[1], a)


class _Loader:
    """The WeightLoader interface the llama module builds from, over a checkpoint's tensors."""

    def __init__(self, ckpt: Checkpoint, placement: Placement):
        self.ckpt, self.placement = ckpt, placement
        self.linears: list[Linear] = []

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def vector(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.ckpt.tensors[name], dtype=np.float32)

    def optional_vector(self, name: str) -> np.ndarray | None:
        return self.vector(name) if self.has(name) else None

    def gguf_weight(self, name: str) -> Weight:
        return self.ckpt.weight(name)

    def linear(self, name: str) -> Linear:
        lin = self.placement.build(self.ckpt.weight(name))
        self.linears.append(lin)
        return lin


def load_model(path: str | os.PathLike, n_ctx: int = 0, placement: Placement | None = None) -> Model:
    """The llama model of a llama2.c checkpoint; n_ctx <= 0 takes the checkpoint's seq_len; `placement` builds
    the Linears (default: all on the CPU)."""
    ckpt = Checkpoint(path)
    model = build(ckpt.header.config(), _Loader(ckpt, placement or Placement()),
                  n_ctx if n_ctx > 0 else ckpt.header.seq_len)
    model.arch = "llama2.c"
    return model


def to_gguf(checkpoint: str | os.PathLike, tokenizer: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a checkpoint and its tokenizer as a GGUF `llama` file (float32 tensors, the SentencePiece vocabulary with
    its spaces as "▁" again): the same model for llama.cpp and for npulm's GGUF path. llama2.c's q / k already rotate
    adjacent pairs, GGUF llama's layout, so no permutation."""
    import gguf

    ckpt = Checkpoint(checkpoint)
    h = ckpt.header
    tok = Llama2cTokenizer(tokenizer, h.vocab_size)
    w = gguf.GGUFWriter(os.fspath(out), "llama")
    w.add_block_count(h.n_layers)
    w.add_context_length(h.seq_len)
    w.add_embedding_length(h.dim)
    w.add_feed_forward_length(h.hidden_dim)
    w.add_head_count(h.n_heads)
    w.add_head_count_kv(h.n_kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(h.dim // h.n_heads)
    w.add_tokenizer_model("llama")
    names, types = [], []
    for i, piece in enumerate(tok.pieces):
        if i < 3:
            names.append(("<unk>", "<s>", "</s>")[i])
            types.append(2 if i == 0 else 3)  # unknown, control
        elif i < 259:
            names.append(f"<0x{i - 3:02X}>")
            types.append(6)  # byte
        else:
            names.append(piece.decode("utf-8", errors="replace").replace(" ", "\u2581"))
            types.append(1)
    w.add_token_list(names)
    w.add_token_scores(tok.scores.tolist())
    w.add_token_types(types)
    w.add_bos_token_id(Llama2cTokenizer.BOS)
    w.add_eos_token_id(Llama2cTokenizer.EOS)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(True)
    for name, a in ckpt.tensors.items():
        w.add_tensor(name, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(out)


class Llama2cTokenizer:
    """tokenizer.bin: int32 max_token_length, then per token float32 score, int32 length, bytes. Encoding is
    run.c's: BOS, a dummy-prefix space, code points (bytes + 3 where a code point is not in the vocabulary), then
    greedy merges of the best-scoring adjacent pair."""

    BOS, EOS = 1, 2

    def __init__(self, path: str | os.PathLike, vocab_size: int):
        data = Path(path).read_bytes()
        if len(data) < 4:
            raise Llama2cError(f"{path}: too small for a llama2.c tokenizer")
        off = 4
        self.pieces: list[bytes] = []
        scores = []
        for i in range(vocab_size):
            if off + 8 > len(data):
                raise Llama2cError(f"{path}: truncated at token {i} of {vocab_size}")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or off + n > len(data):
                raise Llama2cError(f"{path}: token {i} claims {n} bytes")
            self.pieces.append(data[off:off + n])
            scores.append(score)
            off += n
        self.scores = np.array(scores, np.float32)
        self.lookup = {p: i for i, p in enumerate(self.pieces)}

    @property
    def n_vocab(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        tokens = [self.BOS] if bos else []
        if text:
            tokens.append(self.lookup[b" "])
        for ch in text:
            b = ch.encode("utf-8")
            tokens.extend([self.lookup[b]] if b in self.lookup else [x + 3 for x in b])
        while True:  # merge the best pair until none merges
            best, best_i = -1e10, -1
            for i in range(len(tokens) - 1):
                j = self.lookup.get(self.pieces[tokens[i]] + self.pieces[tokens[i + 1]])
                if j is not None and self.scores[j] > best:
                    best, best_i, best_id = self.scores[j], i, j
            if best_i < 0:
                break
            tokens[best_i:best_i + 2] = [best_id]
        if eos:
            tokens.append(self.EOS)
        return tokens

    def piece(self, prev: int, token: int) -> bytes:
        """run.c's decode: the leading space dropped after BOS, <0xXX> tokens as their byte."""
        p = self.pieces[token]
        if prev == self.BOS and p.startswith(b" "):
            p = p[1:]
        if len(p) == 6 and p.startswith(b"<0x") and p.endswith(b">"):
            try:
                return bytes([int(p[3:5], 16)])
            except ValueError:
                pass
        return p
