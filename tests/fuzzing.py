"""GGUF fuzzing shared by tests/test_fuzz.py (a bounded seeded run in CI) and benchmarks/fuzz.py (long runs).

A GGUF is held as a `Spec` (metadata with its GGUF value types, tensor index and data) and written by `serialize`,
which writes anything, also what gguf.GGUFWriter refuses (nested arrays, wrong types, shapes that do not match the
data). `mutate` draws one seeded case from four families: metadata values (hyper-parameters, tokenizer arrays, chat
templates) changed to hostile values or types; keys removed or duplicated; tensor shapes, types and offsets changed;
raw bytes flipped, inserted, deleted or truncated. `run_case` takes the file through every stage a user's load does
(reader, tokenizer, chat template, model load, a forward pass, detokenization) and classifies the outcome.
"""

from __future__ import annotations

import math
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "?", U64: "Q", I64: "q", F64: "d"}


@dataclass
class Spec:
    kv: list[list] = field(default_factory=list)  # [key, type, value]; arrays: value = (item type, [items])
    tensors: list[list] = field(default_factory=list)  # [name, dims (ggml order), ggml type id, data bytes]
    version: int = 3
    alignment: int = 32

    def get(self, key: str) -> list | None:
        return next((e for e in self.kv if e[0] == key), None)

    def set(self, key: str, vtype: int, value: Any) -> None:
        e = self.get(key)
        if e is None:
            self.kv.append([key, vtype, value])
        else:
            e[1], e[2] = vtype, value

    def copy(self) -> Spec:
        return Spec([[k, t, (v[0], list(v[1])) if t == ARR else v] for k, t, v in self.kv],
                    [[n, list(d), ty, data] for n, d, ty, data in self.tensors], self.version, self.alignment)


def _str(s: Any) -> bytes:
    b = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, v: Any) -> bytes:
    if vtype == STR:
        return _str(v)
    if vtype == ARR:
        itype, items = v if isinstance(v, tuple) else (U8, [])
        return struct.pack("<IQ", itype, len(items)) + b"".join(_value(itype, x) for x in items)
    fmt = _FMT.get(vtype)
    if fmt is None:
        return b""
    try:
        return struct.pack("<" + fmt, v)
    except (struct.error, TypeError, OverflowError):
        return struct.pack("<" + fmt, 0)


def serialize(spec: Spec) -> bytes:
    out = [b"GGUF", struct.pack("<IQQ", spec.version, len(spec.tensors), len(spec.kv))]
    for key, vtype, v in spec.kv:
        out += [_str(key), struct.pack("<I", vtype), _value(vtype, v)]
    offsets, off = [], 0
    for _, _, _, data in spec.tensors:
        offsets.append(off)
        off += -(-len(data) // spec.alignment) * spec.alignment
    for (name, dims, ttype, _), o in zip(spec.tensors, offsets):
        out += [_str(name), struct.pack("<I", len(dims)), struct.pack(f"<{len(dims)}Q", *(d % 2**64 for d in dims)),
                struct.pack("<IQ", ttype, o)]
    head = b"".join(out)
    head += bytes(-len(head) % spec.alignment)
    body = b"".join(data + bytes(-len(data) % spec.alignment) for _, _, _, data in spec.tensors)
    return head + body


def spec_from_file(path: str | Path) -> Spec:
    import gguf

    r = gguf.GGUFReader(str(path))
    spec = Spec()
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        types = [int(t) for t in f.types]
        v = f.contents()
        spec.kv.append([name, ARR, (types[1], list(v))] if types[0] == ARR else [name, types[0], v])
    a = spec.get("general.alignment")
    spec.alignment = int(a[2]) if a else 32
    for t in r.tensors:
        spec.tensors.append([t.name, [int(d) for d in t.shape], int(t.tensor_type), bytes(t.data.tobytes())])
    return spec


def gpt2_variant(spec: Spec, seed: int = 0) -> Spec:
    """The same model with a byte-level BPE (gpt2) vocabulary and merges, to reach the tokenizers-library path."""
    from npulm.tokenizer import _gpt2_byte_decoder

    s = spec.copy()
    chars = sorted(_gpt2_byte_decoder(), key=lambda c: _gpt2_byte_decoder()[c])
    pairs = [("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("h", "e"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n")]
    tokens = chars + [a + b for a, b in pairs] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    s.kv = [e for e in s.kv if not e[0].startswith("tokenizer.ggml.")]
    s.set("tokenizer.ggml.model", STR, "gpt2")
    s.set("tokenizer.ggml.pre", STR, "smollm")
    s.set("tokenizer.ggml.tokens", ARR, (STR, tokens))
    s.set("tokenizer.ggml.token_type", ARR, (I32, types))
    s.set("tokenizer.ggml.merges", ARR, (STR, [f"{a} {b}" for a, b in pairs]))
    s.set("tokenizer.ggml.bos_token_id", U32, len(tokens) - 3)
    s.set("tokenizer.ggml.eos_token_id", U32, len(tokens) - 3)
    rng = np.random.default_rng(seed)
    for t in s.tensors:
        if t[0] == "token_embd.weight":
            t[1] = [t[1][0], len(tokens)]
            t[2] = 0
            t[3] = (rng.standard_normal(t[1][0] * len(tokens)) * 0.5).astype(np.float32).tobytes()
    return s


# --- mutations ----------------------------------------------------------------------------------------------------
INTS = [0, 1, -1, 2, 3, 7, 255, 256, 65535, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
FLOATS = [0.0, -0.0, 1.5, -1.0, 1e-45, 1e38, math.inf, -math.inf, math.nan, 1e300]
HOSTILE_TEMPLATES = [
    "{{ 1/0 }}", "{{ range(10**9)|list }}", "{{ 'a' * 10**10 }}", "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{{ 'x'|center(10**10) }}", "{{ '%99999999999d' % 1 }}", "{{ messages[5]['content'] }}", "{{ x.y.z }}",
    "{% if %}", "{{ ''.__class__.__mro__ }}", "{{ raise_exception('no') }}", "{{ messages|tojson }}",
    "{{ (messages * 10**8)|length }}", "{{ 10 ** 10 ** 10 }}", "{{ strftime_now('%Y') }}" * 3, "{%" * 5000,
]
HPARAM_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.key_length", "attention.value_length",
               "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count", "rope.scaling.factor",
               "attention.sliding_window", "attention.sliding_window_pattern", "rope.freq_base_swa"]
TOKENIZER_KEYS = ["tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                  "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "general.architecture",
                  "general.alignment"]


def _random_value(rng: np.random.Generator, spec: Spec) -> tuple[int, Any]:
    kind = rng.integers(12)
    if kind <= 2:
        return int(rng.choice([U8, I8, U16, I16, U32, I32, U64, I64])), int(rng.choice(INTS))
    if kind == 3:
        return int(rng.choice([F32, F64])), float(rng.choice(FLOATS))
    if kind == 4:
        return BOOL, bool(rng.integers(2))
    if kind == 5:
        return STR, str(rng.choice(["", "llama", "gpt2", "x" * 300, "\u2581", "<s>", "a b", "\ud800x"]))
    if kind == 6:
        n = int(rng.choice([0, 1, 3, 300]))
        return ARR, (int(rng.choice([I32, F32, U8, STR])), [0 if rng.integers(2) else "a"] * n)
    if kind == 7:  # nested arrays, some deeper than the reader allows
        depth = int(rng.integers(1, 8))
        v: Any = (U32, [1, 2])
        for _ in range(depth):
            v = (ARR, [v])
        return ARR, v
    if kind == 8:
        return int(rng.integers(13, 2**32)), 0  # an unknown type id
    return int(rng.choice([U32, I32, U64])), int(rng.integers(0, 300))  # plausible but wrong


def _mutate_value(rng: np.random.Generator, spec: Spec, entry: list) -> None:
    key, vtype, v = entry
    r = rng.integers(6)
    if vtype == ARR and r < 4:
        itype, items = v
        items = list(items)
        op = rng.integers(7)
        if op == 0 and items:
            del items[int(rng.integers(len(items))):]
        elif op == 1 and items:
            i = int(rng.integers(len(items)))
            items[i] = items[int(rng.integers(len(items)))]  # duplicates
        elif op == 2 and items and itype == STR:
            i = int(rng.integers(len(items)))
            items[i] = str(rng.choice(["", "zz qq", "\u2581 ?", "a", "<0xZZ>", "a" * 200, "Ġ Ġ Ġ"]))
        elif op == 3 and items:
            i = int(rng.integers(len(items)))
            items[i] = rng.choice(INTS) if itype != STR else f"{items[i]}x"
        elif op == 4:
            itype = int(rng.choice([U8, I8, I32, U64, F32, F64, BOOL, STR]))
            items = [0 if itype != STR else "a"] * len(items)
        elif op == 5 and itype in (F32, F64) and items:
            items[int(rng.integers(len(items)))] = float(rng.choice(FLOATS))
        else:
            items = items * 2
        entry[2] = (itype, items)
        return
    if r == 4 and vtype in _FMT:
        entry[2] = rng.choice(FLOATS) if vtype in (F32, F64) else int(rng.choice(INTS))
        return
    entry[1], entry[2] = _random_value(rng, spec)


def _mutate_tensor(rng: np.random.Generator, spec: Spec) -> None:
    t = spec.tensors[int(rng.integers(len(spec.tensors)))]
    op = rng.integers(8)
    if op == 0:  # swap or transpose the dims
        t[1] = list(reversed(t[1]))
    elif op == 1:
        i = int(rng.integers(len(t[1])))
        t[1][i] = int(rng.choice([0, 1, t[1][i] * 2, t[1][i] // 2 or 1, t[1][i] + 32, 2**40, 2**64 - 1]))
    elif op == 2:
        t[1] = t[1] + [1] * int(rng.integers(1, 5))
    elif op == 3:
        t[2] = int(rng.choice([1, 2, 8, 12, 30, 39, 99, 2**31]))
    elif op == 4:
        spec.tensors.remove(t)
    elif op == 5:
        t[0] = str(rng.choice([spec.tensors[0][0], "blk.99.attn_q.weight", "", "x" * 70, "blk.-1.attn_q.weight"]))
    elif op == 6:
        t[3] = t[3][: int(rng.integers(len(t[3]) + 1))]
    else:  # the shape of another tensor, with this data: wrong shape, right size or not
        t[1] = list(spec.tensors[int(rng.integers(len(spec.tensors)))][1])


def _mutate_bytes(rng: np.random.Generator, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 6))):
        if not b:
            break
        op = rng.integers(6)
        pos = int(rng.integers(min(len(b), 8192)))  # most structure lives in the header and metadata
        if op == 0:
            b[pos] ^= 1 << int(rng.integers(8))
        elif op == 1:
            b[pos] = int(rng.integers(256))
        elif op == 2:
            n = int(rng.choice([4, 8]))
            b[pos:pos + n] = (int(rng.choice(INTS)) % 2**64).to_bytes(16, "little")[:n] if rng.integers(2) \
                else int(rng.integers(0, 2**31)).to_bytes(n, "little")
        elif op == 3:
            del b[pos:pos + int(rng.integers(1, 16))]
        elif op == 4:
            b[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
        else:
            del b[int(rng.integers(len(b) + 1)):]
    return bytes(b)


def mutate(bases: list[Spec], seed: int) -> tuple[bytes, str]:
    """Case `seed`: the mutated file's bytes and the family of mutation it came from."""
    rng = np.random.default_rng(seed)
    spec = bases[int(rng.integers(len(bases)))].copy()
    arch = next((e[2] for e in spec.kv if e[0] == "general.architecture"), "llama")
    family = str(rng.choice(["hparam", "tokenizer", "template", "kv", "tensor", "bytes", "mixed"],
                            p=[0.2, 0.15, 0.05, 0.1, 0.15, 0.25, 0.1]))
    for _ in range(int(rng.integers(1, 3)) if family != "mixed" else 4):
        f = family if family != "mixed" else str(rng.choice(["hparam", "tokenizer", "kv", "tensor"]))
        if f == "hparam":
            key = f"{arch}.{rng.choice(HPARAM_KEYS)}"
            entry = spec.get(key) or (spec.kv.append([key, U32, 1]) or spec.kv[-1])
            _mutate_value(rng, spec, entry)
        elif f == "tokenizer":
            entry = spec.get(str(rng.choice(TOKENIZER_KEYS)))
            if entry is not None:
                _mutate_value(rng, spec, entry)
        elif f == "template":
            spec.set("tokenizer.chat_template", STR, str(rng.choice(HOSTILE_TEMPLATES)))
        elif f == "kv":
            op = rng.integers(3)
            i = int(rng.integers(len(spec.kv)))
            if op == 0:
                del spec.kv[i]
            elif op == 1:
                spec.kv.append(list(spec.kv[i]))  # duplicate key
            else:
                spec.kv[i][0] = str(rng.choice(["", "x" * 1000, spec.kv[0][0] + ".", "\ud800"]))
        elif f == "tensor" and spec.tensors:
            _mutate_tensor(rng, spec)
    if family == "kv" and rng.integers(4) == 0:
        spec.version = int(rng.choice([0, 1, 2, 4, 2**31]))
    data = serialize(spec)
    if family == "bytes":
        data = _mutate_bytes(rng, data)
    return data, family


# --- running a case -----------------------------------------------------------------------------------------------
ACCEPTED, CLEAN, OTHER, CRASH, HANG = "accepted", "clean error", "other exception", "crash", "hang"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat"}]


def _forward(model: Any, ids: list[int]) -> np.ndarray:
    if hasattr(model, "make_cache"):
        return model.forward(ids, model.make_cache())
    return model.forward(ids, 0)


def run_case(path: Path, template_seconds: float = 1.0) -> tuple[str, str, str]:
    """(outcome, stage reached, message) for the GGUF at `path`, through every stage of a load and one step."""
    from npulm.chat import ChatTemplate
    from npulm.gguf import GGUFError, GGUFFile
    from npulm.models import load_model
    from npulm.tokenizer import Tokenizer

    stage = "reader"
    try:
        g = GGUFFile(path)  # not closed here: the model's weights are views of its mmap
        stage = "tokenizer"
        tok = Tokenizer.from_gguf(g.kv)
        ids = tok.encode("the cat in the hat", add_bos=True)
        tok.decode(ids)
        stage = "template"
        t = ChatTemplate.from_gguf(g.kv)
        t.max_seconds = template_seconds
        tok.encode(t.render(MESSAGES), special=True)
        stage = "load"
        model = load_model(g, n_ctx=16)
        stage = "forward"
        logits = _forward(model, [i for i in ids if i < model.n_vocab][:4] or [0])
        tok.decode([int(np.argmax(logits[-1])) % tok.vocab_size])
    except (GGUFError, ValueError) as e:
        msg = str(e)
        if not msg.strip():
            return OTHER, stage, f"{type(e).__name__} with an empty message"
        origin = traceback.extract_tb(e.__traceback__)[-1].filename
        if not isinstance(e, GGUFError) and Path(origin).parent.name != "npulm" and "npulm" not in Path(origin).parts:
            # a ValueError from numpy or a library deep in a call is not an error that names what is wrong
            return OTHER, stage, f"{type(e).__name__} from {Path(origin).name}: {msg[:200]}"
        return CLEAN, stage, msg.splitlines()[0][:200]
    except Exception as e:  # noqa: BLE001 - the point is to see any other exception
        return OTHER, stage, f"{type(e).__name__}: {str(e)[:200]}"
    return ACCEPTED, stage, ""


def variant(base: Path, out: Path, kv: dict[str, tuple[int, Any] | None] = (), tensors: dict[str, list] = ()) -> Path:
    """`base` with metadata entries set ((type, value)) or removed (None) and tensor dims replaced: a crafted file."""
    spec = spec_from_file(base)
    for key, tv in dict(kv).items():
        if tv is None:
            spec.kv = [e for e in spec.kv if e[0] != key]
        else:
            spec.set(key, *tv)
    for name, dims in dict(tensors).items():
        next(t for t in spec.tensors if t[0] == name)[1] = list(dims)
    out.write_bytes(serialize(spec))
    return out
