"""Tokenizer tests: tiny hand-checked vocabularies, llama.cpp's own vocab fixtures, and the real models vs llama.cpp."""

from __future__ import annotations

import random
from pathlib import Path

import gguf
import numpy as np
import pytest

from npulm import assets
from npulm.gguf import GGUFError, GGUFFile
from npulm.tokenizer import (
    ADD_BOS,
    BYTE,
    CONTROL,
    IGNORE_MERGES,
    NO_BOS,
    NORMAL,
    PRE_TYPES,
    UNKNOWN,
    USER_DEFINED,
    StreamDecoder,
    Tokenizer,
)


def write_vocab(path: Path, model: str, tokens: list[str], types: list[int], scores: list[float] | None = None,
                merges: list[str] | None = None, pre: str | None = None, **ids: int | bool) -> dict:
    """A GGUF holding only tokenizer metadata, read back through our reader."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if scores is not None:
        w.add_token_scores(scores)
    if merges is not None:
        w.add_token_merges(merges)
    for key, value in ids.items():
        if isinstance(value, bool):
            w.add_bool(f"tokenizer.ggml.{key}", value)
        else:
            w.add_uint32(f"tokenizer.ggml.{key}", value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return GGUFFile(path).kv


# --- a tiny SentencePiece vocabulary --------------------------------------------------------------------------
# File order differs from score order on purpose: "el" comes before "ll" in the file but scores lower, so a
# file-order BPE would split "hello" differently from llama.cpp's score-driven merging.
SPM_PIECES = [("▁", -1), ("h", -2), ("e", -3), ("l", -4), ("o", -5), ("w", -6), ("r", -7), ("d", -8),
              ("el", -50), ("ll", -10), ("he", -20), ("hell", -15), ("▁w", -12), ("or", -13), ("▁wor", -14),
              ("ld", -16), ("▁world", -17)]
SPM_HEAD = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<|ctl|>", CONTROL), ("<ud>", USER_DEFINED)]
BYTE0 = len(SPM_HEAD)  # id of <0x00>


def spm_kv(tmp_path: Path, **flags) -> dict:
    tokens = [t for t, _ in SPM_HEAD] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in SPM_PIECES]
    types = [y for _, y in SPM_HEAD] + [BYTE] * 256 + [NORMAL] * len(SPM_PIECES)
    scores = [0.0] * (len(SPM_HEAD) + 256) + [float(s) for _, s in SPM_PIECES]
    return write_vocab(tmp_path / "spm.gguf", "llama", tokens, types, scores, **flags)


@pytest.fixture
def spm(tmp_path):
    return Tokenizer.from_gguf(spm_kv(tmp_path))


def ids_of(tok: Tokenizer, *pieces: str) -> list[int]:
    return [tok.tokens.index(p) for p in pieces]


def test_spm_merges_follow_scores_not_file_order(spm):
    # by score: ll, ▁w, or, ▁wor, ld, ▁world, he, hell (worked by hand as llama.cpp's llm_tokenizer_spm does)
    assert spm.encode("hello world", add_bos=False) == ids_of(spm, "▁", "hell", "o", "▁world")


def test_spm_bos_default_and_prefix_space(tmp_path, spm):
    assert spm.add_bos and spm.bos_id == 1 and spm.eos_id == 2  # llama.cpp defaults for SPM without keys
    assert spm.encode("hello")[0] == 1
    no_prefix = Tokenizer.from_gguf(spm_kv(tmp_path, add_space_prefix=False, add_bos_token=False))
    assert no_prefix.encode("hello") == ids_of(spm, "hell", "o")


def test_spm_byte_fallback_and_stream(spm):
    ids = spm.encode("é", add_bos=False)
    assert ids == ids_of(spm, "▁") + [BYTE0 + 0xC3, BYTE0 + 0xA9]
    assert spm.token_to_bytes(ids[1]) == b"\xc3"
    d = StreamDecoder(spm)
    assert [d.add(i) for i in ids] == [" ", "", "é"]
    assert d.flush() == ""
    assert spm.decode(ids[1:2]) == "\ufffd"  # an incomplete character on its own


def test_spm_special_and_user_defined_tokens(spm):
    ctl, ud = 3, 4
    parsed = spm.encode("<|ctl|>hello<ud>", add_bos=False, special=True)
    # llama.cpp prefixes a space to text that follows a special token
    assert parsed == [ctl, *ids_of(spm, "▁", "hell", "o"), ud]
    plain = spm.encode("<|ctl|>hello<ud>", add_bos=False)
    assert ctl not in plain and plain[-1] == ud  # user-defined tokens are matched even without special
    assert spm.decode(parsed) == " hello<ud>" and spm.decode(parsed, special=True) == "<|ctl|> hello<ud>"


def test_spm_decode_round_trip_strips_prefix_after_bos(spm):
    text = "hello world é"
    ids = spm.encode(text)
    assert ids[0] == spm.bos_id
    assert spm.decode(ids) == text
    assert spm.decode(ids[1:]) == " " + text  # as llama-cpp-python: only a BOS-led sequence drops the prefix


# --- a tiny byte-level BPE vocabulary -------------------------------------------------------------------------
def _byte_chars() -> list[str]:
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


BPE_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "1 2", "12 3"]


def bpe_kv(tmp_path: Path, pre: str, name: str = "bpe.gguf", **flags) -> dict:
    head = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merged = [m.replace(" ", "") for m in BPE_MERGES] + ["xyz"]  # "xyz" has no merge path
    tokens = head + _byte_chars() + merged
    # <|im_end|> is stored as NORMAL: llama.cpp recognises it by name and makes it a control token
    types = [CONTROL, CONTROL, NORMAL] + [NORMAL] * (256 + len(merged))
    return write_vocab(tmp_path / name, "gpt2", tokens, types, merges=BPE_MERGES, pre=pre, eos_token_id=0,
                       bos_token_id=1, **flags)


@pytest.fixture
def bpe(tmp_path):
    return Tokenizer.from_gguf(bpe_kv(tmp_path, "gpt-2"))


def test_bpe_basic(bpe):
    assert not bpe.add_bos  # gpt2 default when the key is absent
    ids = bpe.encode("hello world")
    assert ids == ids_of(bpe, "hello", "Ġworld")
    assert bpe.token_to_bytes(ids[1]) == b" world"
    assert bpe.decode(ids) == "hello world"
    assert bpe.encode("hello", add_bos=True)[0] == 1


def test_bpe_pre_tokenizer_regex_by_name(tmp_path, bpe):
    assert bpe.encode("123") == ids_of(bpe, "123")
    smollm = Tokenizer.from_gguf(bpe_kv(tmp_path, "smollm", "smollm.gguf"))  # llama.cpp splits digits first
    assert smollm.encode("123") == ids_of(bpe, "1", "2", "3")
    assert bpe.encode("xyz") == ids_of(bpe, "x", "y", "z")
    llama3 = Tokenizer.from_gguf(bpe_kv(tmp_path, "llama-bpe", "llama3.gguf"))  # ignore_merges: whole words win
    assert llama3.encode("xyz", add_bos=False) == ids_of(bpe, "xyz")
    assert llama3.add_bos  # llama.cpp's default for the llama3 family


def test_bpe_special_tokens_and_eog(bpe):
    text = "<|im_start|>hello<|im_end|>"
    assert bpe.encode(text, special=True) == [1, *ids_of(bpe, "hello"), 2]
    plain = bpe.encode(text)
    assert 1 not in plain and 2 not in plain and len(plain) > 10
    assert bpe.eog_ids == {0, 2} and bpe.is_special(2)
    assert bpe.decode([1, 5, 2]) == bpe.decode([5])
    assert bpe.decode([1, 2], special=True) == "<|im_start|><|im_end|>"


def test_bpe_multibyte_stream(bpe):
    ids = bpe.encode("é€😀")
    assert len(ids) == 2 + 3 + 4  # no merges: one token per byte
    d = StreamDecoder(bpe)
    assert [d.add(i) for i in ids] == ["", "é", "", "", "€", "", "", "", "😀"]


@pytest.mark.parametrize("which", ["spm", "bpe"])
def test_stream_equals_decode_on_random_ids(which, spm, bpe):
    tok = {"spm": spm, "bpe": bpe}[which]
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.3 and tok.bos_id is not None:
            ids.insert(0, tok.bos_id)
        for special in (False, True):
            d = StreamDecoder(tok, special)
            assert "".join(d.feed(ids)) + d.flush() == tok.decode(ids, special)


def test_errors(tmp_path):
    kv = write_vocab(tmp_path / "bert.gguf", "bert", ["[PAD]", "a"], [CONTROL, NORMAL])
    with pytest.raises(GGUFError, match="bert"):
        Tokenizer.from_gguf(kv)
    with pytest.raises(GGUFError, match="no-such-pre"):
        Tokenizer.from_gguf(bpe_kv(tmp_path, "no-such-pre", "bad.gguf"))


# --- llama.cpp's vocabulary fixtures (models/ggml-vocab-*.gguf + .inp/.out) ---------------------------------------
# The vocabularies llama.cpp's tests/CMakeLists.txt runs test-tokenizer-0 on.
FIXTURE_VOCABS = ["bert-bge", "command-r", "deepseek-coder", "deepseek-llm", "falcon", "gemma-4", "gpt-2", "llama-bpe",
                  "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"]
UNSUPPORTED = {"bert-bge": "WordPiece (bert) tokenizers are not supported"}


@pytest.fixture(scope="module")
def vocab_dir() -> Path:
    try:
        return assets.llama_cpp_models_dir()
    except assets.AssetError as e:
        pytest.skip(f"llama.cpp vocab fixtures unavailable: {e}")


def read_cases(inp: Path, out: Path) -> list[tuple[str, list[int]]]:
    """As tests/test-tokenizer-0.cpp: inputs split on the separator (no empty case after a final separator)."""
    texts = inp.read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(texts) == len(lines), f"{inp.name}: {len(texts)} inputs, {len(lines)} outputs"
    return [(t, [int(x) for x in line.split()]) for t, line in zip(texts, lines)]


def test_fixture_list_is_complete(vocab_dir):
    present = {p.name[len("ggml-vocab-"):-len(".gguf.inp")] for p in vocab_dir.glob("ggml-vocab-*.gguf.inp")}
    assert present <= set(FIXTURE_VOCABS), f"new llama.cpp vocab fixtures: {sorted(present - set(FIXTURE_VOCABS))}"


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(raises=GGUFError, strict=True, reason=UNSUPPORTED[n]))
    if n in UNSUPPORTED else n for n in FIXTURE_VOCABS])
def test_llama_cpp_vocab_fixture(vocab_dir, name):
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    if not path.with_suffix(".gguf.inp").is_file():
        pytest.skip(f"{path.name} has no .inp/.out in this llama.cpp version")
    tok = Tokenizer.from_gguf(GGUFFile(path).kv)
    cases = read_cases(path.with_suffix(".gguf.inp"), path.with_suffix(".gguf.out"))
    failed = [(text, want, got) for text, want in cases if (got := tok.encode(text, add_bos=False)) != want]
    assert not failed, (f"{name}: {len(cases) - len(failed)}/{len(cases)} pass; first failures: "
                        + "; ".join(f"{t!r}: want {w} got {g}" for t, w, g in failed[:3]))


# --- the real models against llama.cpp ---------------------------------------------------------------------------
_WORDS = ["Hello", "world", "the", " quick", "don't", "I'm", "we'll", "they've", "it's", "IT'S", "def", "return",
          "self.x", "print(", ")", "{", "}", "=>", "==", "!=", "<=", "//", "/*", "*/", "#include", "0x1F", "3.14159",
          "1234567", "2024-01-01", "<|im_start|>", "<|im_end|>", "<start_of_turn>", "<end_of_turn>", "<bos>",
          "</s>", "<s>", "<table>", "<h1>", "▁", "Ġ", "<0x0A>", "café", "naïve", "Straße", "Привет", "мир", "日本",
          "中文", "λ", "∑", "→", "…", "\u200b", "e\u0301", "\u00a0", "\u3000", "\u2009"]
_ALPHABETS = ["abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
              "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~", "éèêëàâäôöûüçñåøæßÉÀÇÑÅØ",
              "абвгдежзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗ",
              "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年日本語漢字",
              "가나다라마바사아자차카타파하한국어", "😀🦙👍🏽🔥✨❤️🇫🇷", "      \t\t\n\n\r"]
_SEPARATORS = [" ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n", "\r\n", ""]


def random_strings(n: int, seed: int) -> list[str]:
    """Mixed-script strings with whitespace runs, digits, code and special-token look-alikes."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 12)):
            if rng.random() < 0.35:
                parts.append(rng.choice(_WORDS))
            else:
                alphabet = rng.choice(_ALPHABETS)
                parts.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
            if rng.random() < 0.5:
                parts.append(rng.choice(_SEPARATORS))
        out.append("".join(parts))
    return out


_WS_POOL = [" ", "\t", "\n", "\r", "\x0b", "\u00a0", "\u3000", "\u2009", "\u200b", "\u2028", "\x0c", "\x85", "a", "Z",
            "1", "é", "я", "中", "!", "'", "<", ">", "▁", "😀", "s", "'s", " 's", "Ab", "ひら", "12345", "$", "`"]


def whitespace_strings(n: int, seed: int) -> list[str]:
    """Runs of (Unicode) whitespace, contractions and single characters: where pre-tokenizers disagree."""
    rng = random.Random(seed)
    return ["".join(rng.choice(_WS_POOL) * rng.choice([1, 1, 1, 2, 3, 5, 17]) for _ in range(rng.randint(1, 15)))
            for _ in range(n)]


@pytest.fixture(scope="module", params=[assets.SMOLLM2, assets.GEMMA3])
def real(request):
    llama_cpp = pytest.importorskip("llama_cpp")
    try:
        path = assets.model_path(request.param)
    except assets.AssetError as e:
        pytest.skip(str(e))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    return request.param, Tokenizer.from_file(path), llm, llama_cpp


@pytest.mark.oracle
def test_random_strings_match_llama_cpp(real):
    name, tok, llm, _ = real
    strings = random_strings(1000, seed=2026) + whitespace_strings(300, seed=2027)
    enc_bad, dec_bad = [], []
    for s in strings:
        want = llm.tokenize(s.encode(), add_bos=False, special=False)
        got = tok.encode(s, add_bos=False)
        if got != want:
            enc_bad.append((s, want, got))
        # no BOS in front, so llama-cpp-python's detokenize is the plain concatenation of pieces, like ours
        if tok.decode(want) != llm.detokenize(want).decode("utf-8", errors="replace"):
            dec_bad.append(s)
    assert not enc_bad, f"{name}: {len(enc_bad)}/{len(strings)} encode mismatches, e.g. {enc_bad[:2]}"
    assert not dec_bad, f"{name}: {len(dec_bad)}/{len(strings)} decode mismatches, e.g. {dec_bad[:2]}"


@pytest.mark.oracle
def test_special_parsing_and_bos_match_llama_cpp(real):
    name, tok, llm, _ = real
    texts = ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
             "<bos><start_of_turn>user\nHi  there\t<end_of_turn>\n<start_of_turn>model\n", "plain text</s> and <s>"]
    texts += random_strings(200, seed=99)
    for s in texts:
        assert tok.encode(s, special=True) == llm.tokenize(s.encode(), add_bos=True, special=True), (name, s)


@pytest.mark.oracle
def test_special_ids_and_attributes_match_llama_cpp(real):
    name, tok, llm, llama_cpp = real
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    assert (tok.bos_id, tok.eos_id) == (llm.token_bos(), llm.token_eos())
    assert tok.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    special_attr = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    eog = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    special = {i for i in range(tok.vocab_size) if llama_cpp.llama_vocab_get_attr(vocab, i) & special_attr}
    assert tok.eog_ids == eog
    assert {i for i in range(tok.vocab_size) if tok.is_special(i)} == special


def test_real_models_build_and_round_trip():
    """Cheap checks on the real vocabularies (no llama.cpp): build time and encode/decode round trips."""
    import time

    for name in (assets.SMOLLM2, assets.GEMMA3):
        try:
            path = assets.model_path(name)
        except assets.AssetError as e:
            pytest.skip(str(e))
        kv = GGUFFile(path).kv
        t0 = time.perf_counter()
        tok = Tokenizer.from_gguf(kv)
        elapsed = time.perf_counter() - t0
        assert elapsed < 6.0, f"{name}: building took {elapsed:.1f} s"  # ~1-2 s; generous for loaded CI machines
        if name == assets.GEMMA3:  # whitespace runs and newlines are user-defined tokens, matched before merging
            assert tok.encode("a  b\n\n\tc", add_bos=False) == ids_of(tok, "a", "  ", "b", "\n\n", "\t", "c")
        for s in random_strings(200, seed=5):
            if tok.escaped_spaces:  # SentencePiece spells spaces "▁", so a literal "▁" comes back as a space
                s = s.replace("▁", "_")
            assert tok.decode(tok.encode(s, add_bos=False)) == s


# --- every supported vocabulary and pre-tokenizer against llama.cpp ----------------------------------------------
def _vocab_special_sets(tok: Tokenizer, llm, llama_cpp) -> tuple[set, set, set, set]:
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    special_attr = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
    n = tok.vocab_size
    return (tok.eog_ids, {i for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)},
            {i for i in range(n) if tok.is_special(i)},
            {i for i in range(n) if llama_cpp.llama_vocab_get_attr(vocab, i) & special_attr})


# falcon's vocabulary lacks some byte tokens (e.g. "\v"): llama.cpp keeps such a byte as a barrier between merges,
# the tokenizers library drops it first and merges its neighbours.
ORACLE_XFAIL = {"falcon": "vocabulary lacks byte tokens that appear in the whitespace strings"}


@pytest.mark.oracle
@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=ORACLE_XFAIL[n])) if n in ORACLE_XFAIL else n
    for n in FIXTURE_VOCABS if n not in UNSUPPORTED])
def test_fixture_vocab_matches_live_llama_cpp(vocab_dir, name):
    """Plain and special-parsing tokenization with the GGUF's BOS default, EOG and special sets, per vocabulary."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = vocab_dir / f"ggml-vocab-{name}.gguf"
    tok = Tokenizer.from_file(path)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    rng = random.Random(33)
    specials = [t for i, t in enumerate(tok.tokens) if tok.types[i] in (CONTROL, UNKNOWN, USER_DEFINED)][:60]
    # special tokens followed by ASCII and Unicode whitespace (phi-3 strips the ASCII part after its specials)
    around = [rng.choice(["", "a", " b "]) + t + rng.choice([" ", "\n ", "\u3000", "\xa0\n", "  x", ""]) + "end"
              for t in specials]
    bad = []
    for s in random_strings(300, seed=31) + whitespace_strings(300, seed=32) + around:
        if tok.encode(s, add_bos=False) != llm.tokenize(s.encode(), add_bos=False, special=False):
            bad.append(("plain", s))
        if tok.encode(s, special=True) != llm.tokenize(s.encode(), add_bos=True, special=True):
            bad.append(("special+bos", s))
    assert not bad, f"{name}: {len(bad)} mismatches, e.g. {bad[:3]}"
    eog, want_eog, special, want_special = _vocab_special_sets(tok, llm, llama_cpp)
    assert eog == want_eog and special == want_special


def _pre_representatives() -> list[str]:
    """One tokenizer.ggml.pre name per distinct behaviour (regex set, ignore_merges, BOS default)."""
    seen, names = set(), []
    for pre, split in sorted(PRE_TYPES.items()):
        key = (split, pre in IGNORE_MERGES, pre in ADD_BOS, pre in NO_BOS)
        if split != "newlines" and key not in seen:
            seen.add(key)
            names.append(pre)
    return names


@pytest.mark.oracle
@pytest.mark.parametrize("pre", _pre_representatives())
def test_pre_tokenizer_matches_live_llama_cpp(vocab_dir, tmp_path, pre):
    """The gpt-2 fixture vocabulary relabelled with each pre-tokenizer name, tokenized by both sides."""
    llama_cpp = pytest.importorskip("llama_cpp")
    kv = GGUFFile(vocab_dir / "ggml-vocab-gpt-2.gguf").kv
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), kv["general.architecture"])
    for key, value in kv.items():  # hparams llama.cpp reads even for vocab_only
        if key == "general.architecture" or key.startswith("tokenizer."):
            continue
        if isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(kv["tokenizer.ggml.tokens"])
    w.add_token_types(kv["tokenizer.ggml.token_type"].tolist())
    w.add_token_merges(kv["tokenizer.ggml.merges"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = Tokenizer.from_file(path)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    bad = [s for s in random_strings(150, seed=41) + whitespace_strings(150, seed=42)
           if tok.encode(s) != llm.tokenize(s.encode(), add_bos=True, special=False)]
    assert not bad, f"pre {pre!r} ({PRE_TYPES[pre]}): {len(bad)}/300 mismatches, e.g. {bad[:3]}"


# --- bad input (issue 14) -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("change, message", [
    ({"tokenizer.ggml.merges": ["h zz"]}, r"tokenizer.ggml.merges\[0\] = 'h zz'"),
    ({"tokenizer.ggml.merges": ["h"]}, r"tokenizer.ggml.merges\[0\]"),
    ({"tokenizer.ggml.merges": np.arange(3)}, "tokenizer.ggml.merges: expected an array of strings"),
    ({"tokenizer.ggml.token_type": ["a", "b"]}, "tokenizer.ggml.token_type: expected an array of integers"),
    ({"tokenizer.ggml.token_type": np.array([1.5])}, "tokenizer.ggml.token_type: expected an array of integers"),
    ({"tokenizer.ggml.tokens": [["nested"]]}, "tokenizer.ggml.tokens: expected an array of strings"),
    ({"tokenizer.ggml.add_bos_token": np.arange(2)}, "tokenizer.ggml.add_bos_token: expected a boolean"),
    ({"tokenizer.ggml.pre": 7}, "tokenizer.ggml.pre: expected a string"),
])
def test_bad_vocabulary_metadata_names_the_key(tmp_path, change, message):
    """Issue 14 item 2: a merge naming a missing token gave a bare Exception, a retyped key a TypeError."""
    kv = {**bpe_kv(tmp_path, "gpt-2"), **change}
    with pytest.raises(GGUFError, match=message):
        Tokenizer.from_gguf(kv)


def test_bad_scores_name_the_key(tmp_path):
    kv = {**spm_kv(tmp_path), "tokenizer.ggml.scores": ["x"] * 400}
    with pytest.raises(GGUFError, match="tokenizer.ggml.scores: expected an array of finite numbers"):
        Tokenizer.from_gguf(kv)


def test_invalid_unicode_text_is_a_clear_error(spm, bpe):
    """Issue 14 item 6: a lone surrogate (invalid UTF-8 from argv, or sent through the API) gave a TypeError."""
    bad = b"caf\xff".decode("utf-8", "surrogateescape")
    for tok in (spm, bpe):
        with pytest.raises(ValueError, match="lone surrogate U\\+DCFF at character 3"):
            tok.encode(bad)
        with pytest.raises(ValueError, match="lone surrogate"):
            tok.encode_batch(["ok", "\ud800"])


@pytest.mark.parametrize("token", [10**6, -1, 1.0, True])
def test_token_ids_out_of_range_are_errors(spm, bpe, token):
    """Issue 14 item 7: detokenize([10**6]) raised IndexError and [-1] returned the last token's bytes."""
    for tok in (spm, bpe):
        with pytest.raises(ValueError, match="is not in the vocabulary"):
            tok.decode([token])
        with pytest.raises(ValueError, match="is not in the vocabulary"):
            tok.token_str(token)
