"""llama2.c checkpoints (legacy, v1, v2 / Q8_0; shared or separate classifier) and tokenizers, written here with
struct as llama2.c's export.py and tokenizer.py write them, against an independent float64 forward that follows
run.c line by line; the CLI in both dialects, on the CPU and W16A16 on the emulated NPU."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest

from npulm import cli
from npulm.evaluate import divergence
from npulm.llama2c import Checkpoint, Llama2cError, Llama2cTokenizer, is_checkpoint, load_model
from npulm.llama2c_cli import Sampler
from npulm.placement import Placement

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, SEQ = 64, 96, 2, 4, 2, 48
WORDS = [" ", *"abcdefghijklmnopqrstuvwxyzO", " O", " On", " Onc", " Once", " u", " up", " upo", " upon", " t",
         " ti", " tim", " time", " a", "er", "in", "he", " the", "on", "ce", "nc", "up", "im", "me", "ti"]
VOCAB = 3 + 256 + len(WORDS)


def write_tokenizer(path) -> None:
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [w.encode() for w in WORDS]
    scores = [0.0] * 259 + [float(len(w)) - i / 100 for i, w in enumerate(WORDS)]  # longer merges first
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p) for p in pieces)))
        for p, s in zip(pieces, scores):
            f.write(struct.pack("<fi", s, len(p)) + p)


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    kv = KV_HEADS * DIM // HEADS

    def m(*shape, scale=0.15):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return {"tok": m(VOCAB, DIM, scale=0.5), "att_norm": 1 + m(LAYERS, DIM, scale=0.1),
            "wq": m(LAYERS, DIM, DIM), "wk": m(LAYERS, kv, DIM), "wv": m(LAYERS, kv, DIM), "wo": m(LAYERS, DIM, DIM),
            "ffn_norm": 1 + m(LAYERS, DIM, scale=0.1), "w1": m(LAYERS, HIDDEN, DIM), "w2": m(LAYERS, DIM, HIDDEN),
            "w3": m(LAYERS, HIDDEN, DIM), "norm": 1 + m(DIM, scale=0.1), "cls": m(VOCAB, DIM)}


def quantize_q80(w: np.ndarray, gs: int) -> tuple[np.ndarray, np.ndarray]:
    """export.py's quantize_q80: symmetric int8 per group of gs values."""
    g = w.reshape(-1, gs).astype(np.float32)
    scale = np.abs(g).max(axis=1) / 127.0
    return np.round(g / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def write_checkpoint(path, w: dict[str, np.ndarray], version: int, shared: bool, gs: int = 32) -> dict:
    """Writes the format; returns the weights the file holds (v2: dequantized), for the reference."""
    dims = [DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ]
    w = dict(w, cls=w["tok"]) if shared else dict(w)
    order = ["tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"] + ([] if shared else ["cls"])
    with open(path, "wb") as f:
        if version == 0:
            f.write(struct.pack("<7i", *dims[:5], VOCAB if shared else -VOCAB, SEQ))
            for n in ("tok", "att_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w2", "w3", "norm"):
                f.write(w[n].tobytes())
            f.write(np.zeros((2, SEQ, DIM // HEADS // 2), np.float32).tobytes())  # RoPE tables, unused
            if not shared:
                f.write(w["cls"].tobytes())
            return w
        f.write(struct.pack("<Ii7iB", 0x616B3432, version, *dims, int(shared)))
        if version == 2:
            f.write(struct.pack("<i", gs))
        f.write(b"\0" * (256 - f.tell()))
        for n in ("att_norm", "ffn_norm", "norm"):
            f.write(w[n].tobytes())
        if version == 1:
            for n in order:
                f.write(w[n].tobytes())
            return w
        held = dict(w)
        for n in order:  # one tensor per layer, each its values then its scales
            parts = w[n] if n not in ("tok", "cls") else w[n][None]
            deq = []
            for part in parts:
                q, s = quantize_q80(part, gs)
                f.write(q.tobytes() + s.tobytes())
                deq.append((q.astype(np.float32) * s[:, None]).reshape(part.shape))
            held[n] = np.stack(deq) if n not in ("tok", "cls") else deq[0]
        if shared:
            held["cls"] = held["tok"]
        return held


def reference_logits(w: dict[str, np.ndarray], tokens: list[int]) -> np.ndarray:
    """run.c's forward in float64, one position at a time."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hs = DIM // HEADS
    kv_dim, kv_mul = KV_HEADS * hs, HEADS // KV_HEADS

    def rmsnorm(x, g):
        return g * (x / math.sqrt(np.mean(x * x) + 1e-5))

    keys = np.zeros((LAYERS, len(tokens), kv_dim))
    values = np.zeros((LAYERS, len(tokens), kv_dim))
    out = []
    for pos, tok in enumerate(tokens):
        x = w["tok"][tok].copy()
        for li in range(LAYERS):
            xb = rmsnorm(x, w["att_norm"][li])
            q, k, v = w["wq"][li] @ xb, w["wk"][li] @ xb, w["wv"][li] @ xb
            for i in range(0, DIM, 2):
                val = pos * (1.0 / 10000.0 ** ((i % hs) / hs))
                fcr, fci = math.cos(val), math.sin(val)
                for vec in (q, k) if i < kv_dim else (q,):
                    v0, v1 = vec[i], vec[i + 1]
                    vec[i], vec[i + 1] = v0 * fcr - v1 * fci, v0 * fci + v1 * fcr
            keys[li, pos], values[li, pos] = k, v
            att_out = np.zeros(DIM)
            for h in range(HEADS):
                kh = (h // kv_mul) * hs
                sc = keys[li, :pos + 1, kh:kh + hs] @ q[h * hs:(h + 1) * hs] / math.sqrt(hs)
                p = np.exp(sc - sc.max())
                att_out[h * hs:(h + 1) * hs] = (p / p.sum()) @ values[li, :pos + 1, kh:kh + hs]
            x = x + w["wo"][li] @ att_out
            xb = rmsnorm(x, w["ffn_norm"][li])
            h1, h3 = w["w1"][li] @ xb, w["w3"][li] @ xb
            x = x + w["w2"][li] @ (h1 / (1 + np.exp(-h1)) * h3)
        out.append(w["cls"] @ rmsnorm(x, w["norm"]))
    return np.array(out)


TOKENS = [1, 300, 5, 77, 270, 281, 263, 290, 262, 264, 300, 299, 3, 258, 271, 280]
FORMATS = [(0, True), (0, False), (1, True), (1, False), (2, True), (2, False)]


@pytest.mark.parametrize("version, shared", FORMATS)
def test_checkpoint_matches_float64_run_c(tmp_path, version, shared):
    path = tmp_path / "model.bin"
    held = write_checkpoint(path, random_weights(), version, shared)
    assert is_checkpoint(path) and Checkpoint(path).header.version == version
    model = load_model(path)
    assert model.n_ctx == SEQ and model.n_vocab == VOCAB
    got = model.forward(TOKENS, model.make_cache(), logits_from=0)
    ref = reference_logits(held, TOKENS)
    np.testing.assert_allclose(got, ref, rtol=0, atol=3e-3 * np.abs(ref).max())  # the KV cache holds float16
    d = divergence(ref, got)
    assert d.mean_kl < 1e-5 and d.top1_rate == 1.0


def test_every_matmul_w16a16_on_the_npu(tmp_path):
    path = tmp_path / "model.bin"
    held = write_checkpoint(path, random_weights(1), 1, False)
    model = load_model(path, placement=Placement(default="npu:W16A16"))
    assert {lin.runs_on for lin in model.linears} == {"npu:W16A16"} and len(model.linears) == 7 * LAYERS + 1
    d = divergence(reference_logits(held, TOKENS), model.forward(TOKENS, model.make_cache(), logits_from=0))
    assert d.mean_kl < 1e-4 and d.top1_rate == 1.0


def test_bad_checkpoints(tmp_path):
    path = tmp_path / "model.bin"
    write_checkpoint(path, random_weights(), 1, True)
    data = path.read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-100])
    with pytest.raises(Llama2cError, match="need"):
        Checkpoint(tmp_path / "short.bin")
    (tmp_path / "v9.bin").write_bytes(data[:4] + struct.pack("<i", 9) + data[8:])
    with pytest.raises(Llama2cError, match="version 9"):
        Checkpoint(tmp_path / "v9.bin")
    (tmp_path / "junk.bin").write_bytes(b"\xff" * 4096)
    assert not is_checkpoint(tmp_path / "junk.bin")


def test_tokenizer_is_run_c(tmp_path):
    write_tokenizer(tmp_path / "tok.bin")
    tok = Llama2cTokenizer(tmp_path / "tok.bin", VOCAB)
    ids = tok.encode("Once upon a time")
    assert [tok.pieces[i] for i in ids[1:]] == [b" Once", b" upon", b" a", b" time"] and ids[0] == 1
    assert tok.encode("é")[2:] == [0xC3 + 3, 0xA9 + 3]  # byte fallback
    text = b"".join(tok.piece(p, t) for p, t in zip(ids, ids[1:]))
    assert text == b"Once upon a time"


def test_sampler_is_run_c():
    s = Sampler(1.0, 0.9, seed=42)
    # run.c's xorshift64* from state 42: the first coins, computed by hand from its formula
    state, coins = 42, []
    for _ in range(3):
        state ^= state >> 12
        state ^= (state << 25) & (2**64 - 1)
        state ^= state >> 27
        coins.append((((state * 0x2545F4914F6CDD1D) % 2**64) >> 32 >> 8) / 16777216.0)
    assert [s.random_f32() for _ in range(3)] == coins
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert Sampler(0.0, 0.9, 1)(logits) == 0
    draws = [Sampler(1.0, 0.7, seed)(logits) for seed in range(1, 200)]
    assert set(draws) == {0, 1}  # the nucleus of p = 0.7 holds the first two tokens


@pytest.mark.parametrize("dialect", ["llama2c", "npulm"])
def test_cli_greedy_run(tmp_path, capfdbinary, dialect):
    path = tmp_path / "model.bin"
    held = write_checkpoint(path, random_weights(2), 0, True)
    write_tokenizer(tmp_path / "tokenizer.bin")
    tok = Llama2cTokenizer(tmp_path / "tokenizer.bin", VOCAB)
    prompt = "Once upon a time"
    ids = tok.encode(prompt)
    if dialect == "llama2c":
        argv = ["run", str(path), "-t", "0", "-n", "24", "-i", prompt]  # tokenizer.bin next to the checkpoint
    else:
        argv = ["run", "-m", str(path), "-z", str(tmp_path / "tokenizer.bin"), "-p", prompt, "-n", "24",
                "--temp", "0", "--cpu"]
    assert cli.main(argv) == 0
    out = capfdbinary.readouterr().out
    want = list(ids)
    while len(want) < 24:  # greedy on the float64 reference, up to a BOS as run.c
        nxt = int(np.argmax(reference_logits(held, want)[-1]))
        if nxt == 1:
            break
        want.append(nxt)
    pieces = [tok.piece(p, t) for p, t in zip(want, want[1:])]
    printable = [p for p in pieces if len(p) > 1 or 32 <= p[0] < 127 or p in (b"\t", b"\n", b"\v", b"\f", b"\r")]
    assert out == b"".join(printable) + b"\n"


@pytest.mark.oracle
@pytest.mark.parametrize("version, shared", [(1, False), (0, True)])
def test_gguf_export_matches_llama_cpp(tmp_path, version, shared):
    """The checkpoint exported to GGUF: llama.cpp's logits and tokens equal the llama2.c loader's."""
    pytest.importorskip("llama_cpp")
    from npulm.reference import LlamaCpp

    path = tmp_path / "model.bin"
    write_checkpoint(path, random_weights(3), version, shared)
    write_tokenizer(tmp_path / "tokenizer.bin")
    out = tmp_path / "model.gguf"
    assert cli.main(["run", str(path), "--export-gguf", str(out)]) == 0
    ref = LlamaCpp(str(out), n_ctx=SEQ)
    tok = Llama2cTokenizer(tmp_path / "tokenizer.bin", VOCAB)
    for text in ("Once upon a time", "the time a tree"):
        assert ref.tokenize(text) == tok.encode(text)
    tokens = [1] + np.random.default_rng(4).integers(3, VOCAB, SEQ - 1).tolist()
    model = load_model(path)
    d = divergence(ref.logits(tokens), model.forward(tokens, model.make_cache(), logits_from=0))
    assert d.mean_kl <= 1e-3 and d.top1_rate >= 0.99


def test_cli_chat_mode(tmp_path, monkeypatch, capfdbinary):
    """run.c's chat: [INST] turns from stdin, the assistant speaks until EOS; the end of input ends the chat."""
    import io

    path = tmp_path / "model.bin"
    write_checkpoint(path, random_weights(5), 1, True)
    write_tokenizer(tmp_path / "tokenizer.bin")
    monkeypatch.setattr("sys.stdin", io.StringIO("\nonce\nupon\n"))  # no system prompt, two turns
    assert cli.main(["run", str(path), "-m", "chat", "-t", "0", "-n", "0", "--cpu"]) == 0
    out = capfdbinary.readouterr().out
    assert out.startswith(b"Enter system prompt (optional): User: Assistant: ")
