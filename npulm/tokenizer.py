"""Tokenizers built from GGUF metadata alone, matching llama.cpp's `llama_tokenize` / `llama_token_to_piece`.

* `llama` (SentencePiece): llama.cpp's own algorithm, written here (spm_encode): adjacent symbols are merged by the
  *score* of the merged token, with `<0xXX>` byte fallback. Spaces become `▁`; `▁` is prepended to the text and to
  every fragment after a special token when `tokenizer.ggml.add_space_prefix` (default true).

The other vocabularies use the Rust `tokenizers` library, translating llama.cpp's semantics:

* `gemma4`: SentencePiece-style BPE with file merges, no space prefix, text split at newline runs.
* `gpt2`: byte-level BPE; the text is first split by llama.cpp's list of regexes for `tokenizer.ggml.pre` (each
  regex splits every piece of the previous one, matches and gaps alike), and llama3-family vocabularies emit a piece
  whole when it is already a token (`ignore_merges`).

Token attributes follow llama.cpp: CONTROL (3) and UNKNOWN (2) tokens are special (only parsed in text when
`special=True`), USER_DEFINED (4) tokens are always matched in text, and tokens that llama.cpp recognises by name
as end-of-generation or FIM markers are promoted to CONTROL as it does.

Known difference: in a byte-level vocabulary that lacks some of the 256 byte tokens (falcon's lacks "\v"), llama.cpp
keeps such a byte as a barrier between merges and emits nothing for it; here it is dropped before merging.
Unsupported: `bert` (WordPiece), `t5` (Unigram), `rwkv`, `plamo2` and the pre-tokenizers with custom C++ code in
llama.cpp (kimi-k2, afmoe, tiny_aya, superbpe, chameleon, youtu, whitespace).
"""

from __future__ import annotations

import codecs
import heapq
import os
import re
import threading
from array import array
from collections.abc import Iterable, Iterator

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

from .gguf import GGUFError, GGUFFile

# GGUF token types (gguf.constants.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # SentencePiece's escaped space "▁"

# --- pre-tokenizer regexes, as in llama.cpp src/llama-vocab.cpp (llm_tokenizer_bpe) ----------------------------
# Case-insensitive groups are spelled out because llama.cpp does so (its std::regex fallback has no (?i:)).
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)"
           r"|\s+")
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
# Letters of deepseek-llm's regex, kept as escapes: several code points here (e.g. U+212A KELVIN SIGN) are not
# NFC-stable and would silently change if typed literally.
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\xb5\xc0-\xd6\xd8-\xf6\xf8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373\u0376\u0377"
    "\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a"
    "\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f"
    "\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2"
    "\U000118a0-\U000118df\U0001e900-\U0001e943"
)
# llama.cpp runs regexes with explicit non-ASCII ranges through std::wregex after turning every non-ASCII whitespace
# character into "\v", so such ranges never match whitespace (U+3000 sits in a punctuation range, U+2009 in a CJK one):
# hence the "&&[^\s]" intersections.
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff&&[^\\s]]+"

# Upper/lower-case letter runs written with ASCII classes, as llama.cpp rewrites tekken / gpt-4o's \p{Lu}/\p{Ll}.
_CASED = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+{c}"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*{c}")
_DEEPSEEK_V3_TAIL = (r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
                     r"| ?[\p{P}\p{S}]+")
_KANA_HAN = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"

SPLITS: dict[str, tuple[str, ...]] = {  # llama.cpp pre-tokenizer type -> regexes applied in turn
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "deepseek-llm": ("[\r\n]", rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+",
                     "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002&&[^\\s]]+", r"\s+\z", _CJK,
                     r"\p{N}+"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-v3": (r"\p{N}{1,3}", _KANA_HAN, _DEEPSEEK_V3_TAIL + r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "spark2_5": (r"\p{N}{1,3}", _KANA_HAN, _DEEPSEEK_V3_TAIL + r"|[\r\n]|\s+(?!\S)|\s+", r"\p{N}"),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    "starcoder": (r"\p{N}", _GPT2),
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    "jais2": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
              + "".join(rf"|\s{{{n}}}(?!\S)" for n in (512, 256, 128, 64, 32, 16, 8, 4)) + r"|\s{1,2}(?!\S)|\s{1}",),
    "tekken": (_CASED.replace("{c}", "") + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "gpt4o": (_CASED.replace("{c}", _CONTRACTIONS + "?")
              + r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "bailingmoe": (r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+",),
    "seed-coder": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)"
                   r"|\s+",),
    "ufakzeka": (r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),
    "exaone-moe": (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?(?:\p{L}\p{M}*(?: \p{L}\p{M}*)*)+|\p{N}"
                   r"| ?[^\s\p{L}\p{N}]+[\r\n/]?|\s*[\r\n]|\s+(?!\S)|\s+",),
    "laguna": (r"[^\n]+|[\n]+", _QWEN2),
    "minicpm5": (r"\p{N}{1,3}", _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "newlines": (r"[^\n]+|[\n]+",),  # gemma4
}
PRE_TYPES: dict[str, str] = {  # tokenizer.ggml.pre -> key of SPLITS (names from llama.cpp's llama_vocab::load)
    "default": "default",
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4", "glm5"], "llama3"),
    "deepseek-llm": "deepseek-llm",
    "deepseek-coder": "deepseek-coder",
    **dict.fromkeys(["deepseek-v3", "hunyuan-dense", "hy_v4", "joyai-llm"], "deepseek-v3"),
    "spark2_5": "spark2_5",
    "falcon": "falcon",
    **dict.fromkeys(["gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "jina-v1-en", "jina-v2-code", "roberta-bpe", "mpt", "olmo", "jais",
                     "trillion", "granite-docling", "exaone4"], "gpt2"),
    **dict.fromkeys(["starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b", "mellum2"],
                    "starcoder"),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan",
                     "solar-open", "grok-2"], "qwen2"),
    "qwen35": "qwen35",
    **dict.fromkeys(["bloom", "poro-chat", "gpt3-finnish"], "bloom"),
    "viking": "viking",
    "jais-2": "jais2",
    "tekken": "tekken",
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], "gpt4o"),
    **dict.fromkeys(["bailingmoe", "bailingmoe2", "llada-moe"], "bailingmoe"),
    "seed-coder": "seed-coder",
    "ufakzeka": "ufakzeka",
    "exaone-moe": "exaone-moe",
    "laguna": "laguna",
    "minicpm5": "minicpm5",
    "gemma4": "newlines",
}
_LLAMA3_FAMILY = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                  "jina-v5-nano"}
IGNORE_MERGES = _LLAMA3_FAMILY | {"glm4", "glm5", "tekken", "youtu", "minicpm5", "granite-embed-multi-97m"}
ADD_BOS = _LLAMA3_FAMILY | {"tekken", "chameleon"}  # pre-tokenizers for which llama.cpp defaults add_bos to true
NO_BOS = {"chatglm-bpe", "glm4", "glm5"}  # ... and those it gives no BOS token at all

# Token texts llama.cpp treats as end of generation (and promotes to CONTROL), llama_vocab::load.
EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")
EOT_NAMES = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
             "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")
FIM_NAMES = {  # name -> candidates; llama.cpp promotes the one it finds to CONTROL (pad/rep/sep also end generation)
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
SUPPORTED_MODELS = ("llama", "gemma4", "gpt2")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table, reversed: printable bytes map to themselves, the rest to 256+."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


_BYTE_DECODER = _gpt2_byte_decoder()


def spm_encode(text: str, vocab: dict[str, int], scores: array, byte_ids: list[int | None], out: list[int]) -> None:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm) on one text fragment: start from single characters,
    repeatedly merge the adjacent pair whose joined text is the highest-scoring vocabulary token (ties: leftmost),
    then emit each symbol's token, or its UTF-8 bytes as <0xXX> tokens.

    Written here instead of the `tokenizers` library's BPE (one merge rule per split of every token): for a 262k
    vocabulary that library held ~110 MB and took ~1 s to build; this needs only the vocabulary dict."""
    n = len(text)
    if n == 0:
        return
    get = vocab.get
    # Symbols are contiguous runs of characters named by their start index; size 0 = merged into its left neighbour.
    size = [1] * n
    prev = list(range(-1, n - 1))
    heap = []
    for i in range(n - 1):
        t = get(text[i:i + 2])
        if t is not None:
            heap.append((-scores[t], i, i + 1, 2))
    heapq.heapify(heap)
    push, pop = heapq.heappush, heapq.heappop
    while heap:
        _, left, right, joined = pop(heap)
        a, b = size[left], size[right]
        if not a or not b or a + b != joined:  # a side changed since this pair was queued
            continue
        size[left], size[right] = joined, 0
        end = left + joined
        if end < n:
            prev[end] = left
            t = get(text[left:end + size[end]])
            if t is not None:
                push(heap, (-scores[t], left, end, joined + size[end]))
        p = prev[left]
        if p >= 0:
            t = get(text[p:end])
            if t is not None:
                push(heap, (-scores[t], p, left, end - p))
    # A merged symbol is always a vocabulary token, so llama.cpp's rev_merge re-split never applies: only single
    # characters can miss the vocabulary, and they fall back to bytes.
    i = 0
    while i < n:
        piece = text[i:i + size[i]]
        t = get(piece)
        if t is not None:
            out.append(t)
        else:
            for byte in piece.encode("utf-8", "surrogatepass"):
                if (t := byte_ids[byte]) is None:
                    raise ValueError(f"the vocabulary has no byte token for 0x{byte:02X} (in {piece!r})")
                out.append(t)
        i += size[i]


def split_special(text: str, specials: list[tuple[str, int]]) -> list[str | int]:
    """llama.cpp's tokenizer_st_partition: cut the text at every occurrence of each special token, longest tokens
    first; returns text fragments and token ids in order."""
    parts: list[str | int] = [text] if text else []
    for name, tid in specials:
        if not any(isinstance(p, str) and name in p for p in parts):
            continue
        out: list[str | int] = []
        for p in parts:
            if isinstance(p, int) or name not in p:
                out.append(p)
                continue
            pieces = p.split(name)
            for k, piece in enumerate(pieces):
                if k:
                    out.append(tid)
                if piece:
                    out.append(piece)
        parts = out
    return parts


def _split_merge(m: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0, so a merge may start with a space
    pos = m.find(" ", 1)
    return (m[:pos], m[pos + 1:]) if pos > 0 else (m, "")


def _strings(kv: dict, key: str) -> list[str]:
    """A string-array metadata value ([] when absent); another type is a GGUFError naming the key."""
    v = kv.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise GGUFError(f"{key}: expected an array of strings, found {_kind(v)}")
    return v


def _numbers(kv: dict, key: str, integer: bool = False) -> np.ndarray | None:
    """A numeric-array metadata value (None when absent); another type is a GGUFError naming the key."""
    v = kv.get(key)
    if v is None:
        return None
    ok = isinstance(v, np.ndarray) and (v.dtype.kind in "iub" if integer else v.dtype.kind in "iuf")
    if not ok or (v.dtype.kind == "f" and not np.isfinite(v).all()):
        what = "integers" if integer else "finite numbers"
        raise GGUFError(f"{key}: expected an array of {what}, found {_kind(v)}")
    return v


def _flag(kv: dict, key: str, default: bool) -> bool:
    v = kv.get(key, default)
    if not isinstance(v, (bool, int)):
        raise GGUFError(f"{key}: expected a boolean, found {_kind(v)}")
    return bool(v)


def _kind(v: object) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of {v.dtype}" + (" with non-finite values" if v.dtype.kind == "f" else "")
    if isinstance(v, list):
        inner = {type(x).__name__ for x in v[:1000]}
        return f"an array of {'/'.join(sorted(inner)) or 'nothing'}"
    return type(v).__name__


def _check_text(text: str) -> None:
    """Text must be valid Unicode: a lone surrogate (from invalid UTF-8 decoded with surrogateescape, or sent as
    such through the API) cannot be tokenized."""
    if not isinstance(text, str):
        raise TypeError(f"text to tokenize must be str, not {type(text).__name__}")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text is not valid Unicode: lone surrogate U+{ord(text[e.start]):04X} at character "
                             f"{e.start} (invalid UTF-8 input?)") from None


def _id(kv: dict, key: str, default: int | None, n: int) -> int | None:
    """A special-token id from the GGUF, else the model's default; out-of-range ids are dropped as llama.cpp does."""
    v = kv.get(f"tokenizer.ggml.{key}")
    if isinstance(v, int) and 0 <= v < n:
        return v
    return default if default is not None and 0 <= default < n else None


class Tokenizer:
    """Text <-> token ids for a GGUF vocabulary, behaving like llama.cpp (see the module docstring)."""

    def __init__(self, kv: dict):
        model = kv.get("tokenizer.ggml.model")
        if model not in SUPPORTED_MODELS:
            raise GGUFError(f"unsupported tokenizer model {model!r} (tokenizer.ggml.model); supported: "
                            f"{', '.join(SUPPORTED_MODELS)}")
        tokens = _strings(kv, "tokenizer.ggml.tokens")
        if not tokens:
            raise GGUFError("GGUF has no tokenizer.ggml.tokens")
        self.model = model
        self.pre = kv.get("tokenizer.ggml.pre") or "default"
        if not isinstance(self.pre, str):
            raise GGUFError(f"tokenizer.ggml.pre: expected a string, found {type(self.pre).__name__}")
        if "" in tokens:  # llama.cpp renames empty entries so that every text is unique
            tokens = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens: list[str] = tokens
        n = len(tokens)
        raw_types = _numbers(kv, "tokenizer.ggml.token_type", integer=True)
        types = [NORMAL] * n if raw_types is None or len(raw_types) == 0 else raw_types[:n].tolist()
        if len(types) < n:
            raise GGUFError(f"tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")

        spm = model == "llama"
        self.escaped_spaces = model in ("llama", "gemma4")  # tokens spell spaces as "▁"
        self.add_space_prefix = _flag(kv, "tokenizer.ggml.add_space_prefix", spm)
        defaults = {"llama": (1, 2, 0), "gpt2": (11, 11, None), "gemma4": (None, None, None)}[model]
        bpe_pre = self.pre if model == "gpt2" else None
        self.bos_id = _id(kv, "bos_token_id", None if bpe_pre in NO_BOS else defaults[0], n)
        self.eos_id = _id(kv, "eos_token_id", defaults[1], n)
        self.unk_id = _id(kv, "unknown_token_id", defaults[2], n)
        self.pad_id = _id(kv, "padding_token_id", None, n)
        add_bos_default = spm or bpe_pre in ADD_BOS
        self.add_bos = _flag(kv, "tokenizer.ggml.add_bos_token", add_bos_default) or model == "gemma4"
        self.add_eos = _flag(kv, "tokenizer.ggml.add_eos_token", False)
        self.eot_id = _id(kv, "eot_token_id", None, n)
        self.eom_id = _id(kv, "eom_token_id", None, n)
        self.eog_ids: set[int] = set()
        self._index = {t: i for i, t in enumerate(tokens)}
        if len(self._index) != n:
            raise GGUFError("tokenizer.ggml.tokens has duplicate entries")
        self._detect_special(kv, types)
        self.types = types

        if spm:
            self._tk = None
        else:
            try:
                self._tk = self._build(kv, types)
            except GGUFError:
                raise
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # the tokenizers library raises bare Exceptions, and panics (BaseException)
                raise GGUFError(f"the {model} vocabulary or tokenizer.ggml.merges is invalid: "
                                f"{type(e).__name__}: {e}") from None
        if spm:
            self._init_spm(kv, types)
        self._rstrip = self._rstrip_patterns(kv, self.tokens, types)
        self._lock = threading.Lock()
        self._pieces: dict[int, bytes] = {}

    @classmethod
    def from_gguf(cls, kv: dict) -> Tokenizer:
        """Build from a GGUF metadata dict (`GGUFFile(path).kv`); `npulm.vocab.load_tokenizer` also reads RWKV's."""
        return cls(kv)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        g = GGUFFile(path)
        try:
            return cls(g.kv)
        finally:
            g.close()

    # --- construction ------------------------------------------------------------------------------------------
    def _detect_special(self, kv: dict, types: list[int]) -> None:
        """llama.cpp's name-based detection of EOT/EOM/FIM/EOG tokens, which also promotes them to CONTROL."""
        index = self._index

        def find(names: Iterable[str]) -> int | None:
            return next((index[s] for s in names if s in index), None)

        if self.eot_id is None:
            self.eot_id = find(EOT_NAMES)
        if self.eom_id is None:
            self.eom_id = find(("<|eom_id|>",))
        self.fim_ids: dict[str, int] = {}
        for key, names in FIM_NAMES.items():
            i = _id(kv, f"{key}_token_id", None, len(self.tokens))
            if i is None and (i := find(names)) is not None:
                types[i] = CONTROL
            if i is not None:
                self.fim_ids[key] = i
        eog = {self.fim_ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if k in self.fim_ids}
        for name in EOG_NAMES:
            if name in index:
                eog.add(index[name])
                types[index[name]] = CONTROL
        # gpt-oss: these are always rendered, i.e. user-defined
        for name in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            if name in index:
                types[index[name]] = USER_DEFINED
        eog |= {i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None}
        texts = {self.tokens[i] for i in eog}
        # harmony / solar-open: "<|end|>" ends a message, not the generation
        if "<|end|>" in texts and (({"<|return|>"} <= texts and texts & {"<|call|>", "<|calls|>"})
                                   or {"<|calls|>", "<|flush|>"} <= texts):
            eog.discard(index["<|end|>"])
            types[index["<|end|>"]] = USER_DEFINED
        # gemma4 / plamo have an ordinary "</s>"
        if "</s>" in texts and texts & {"<|tool_response>", "<|plamo:eos|>"}:
            eog.discard(index["</s>"])
            types[index["</s>"]] = NORMAL
        self.eog_ids = eog

    def _build(self, kv: dict, types: list[int]) -> _HFTokenizer:
        tokens, vocab = self.tokens, self._index
        merges = [_split_merge(m) for m in _strings(kv, "tokenizer.ggml.merges")]
        for i, (a, b) in enumerate(merges):  # the tokenizers library panics or raises a bare Exception on these
            if not a or not b or a not in vocab or b not in vocab or a + b not in vocab:
                raise GGUFError(f"tokenizer.ggml.merges[{i}] = {a + ' ' + b!r}: expected two vocabulary tokens "
                                f"whose concatenation is a token")
        if self.model == "gemma4":
            if not merges:
                raise GGUFError("gemma4 tokenizer without tokenizer.ggml.merges")
            unk = tokens[self.unk_id] if self.unk_id is not None else None
            tk = _HFTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
            space = normalizers.Replace(" ", SPACE)
            tk.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), space]) if self.add_space_prefix
                             else space)
            tk.pre_tokenizer = pre_tokenizers.Split(Regex(SPLITS["newlines"][0]), "isolated")
            tk.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
        else:
            if self.pre not in PRE_TYPES:
                raise GGUFError(f"unsupported pre-tokenizer {self.pre!r} (tokenizer.ggml.pre) for the gpt2 "
                                f"tokenizer; supported: {', '.join(sorted(PRE_TYPES))}")
            if not merges:
                raise GGUFError("gpt2 tokenizer without tokenizer.ggml.merges")
            tk = _HFTokenizer(models.BPE(vocab, merges, ignore_merges=self.pre in IGNORE_MERGES))
            splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in SPLITS[PRE_TYPES[self.pre]]]
            tk.pre_tokenizer = pre_tokenizers.Sequence(
                [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
            tk.decoder = decoders.ByteLevel()
        # control/unknown tokens are parsed only with special=True (encode_special_tokens), user-defined ones always
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                               for t, ty in zip(tokens, types) if ty in (CONTROL, UNKNOWN)])
        tk.add_tokens([AddedToken(t, special=False, normalized=False)
                       for t, ty in zip(tokens, types) if ty == USER_DEFINED])
        return tk

    def _init_spm(self, kv: dict, types: list[int]) -> None:
        """What spm_encode needs: scores, byte tokens, and the special tokens cut out first (llama.cpp's
        cache_special_tokens: longest first; control/unknown ones only when parsing special text)."""
        scores = _numbers(kv, "tokenizer.ggml.scores")
        if scores is None:
            raise GGUFError("llama (SentencePiece) tokenizer without tokenizer.ggml.scores")
        if len(scores) < len(self.tokens):
            raise GGUFError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(self.tokens)} tokens")
        self._scores = array("f", np.asarray(scores, np.float32).tobytes())  # indexing gives Python floats
        index = self._index
        self._byte_ids = [index.get(f"<0x{b:02X}>", index.get(chr(b)) if b < 128 else None) for b in range(256)]
        if self.unk_id is not None:
            self._byte_ids = [self.unk_id if t is None else t for t in self._byte_ids]
        order = sorted((i for i, ty in enumerate(types) if ty in (CONTROL, UNKNOWN, USER_DEFINED)),
                       key=lambda i: -len(self.tokens[i].encode()))
        self._specials = {
            True: [(self.tokens[i], i) for i in order],
            False: [(self.tokens[i], i) for i in order if types[i] == USER_DEFINED]}

    def _encode_spm(self, text: str, special: bool) -> list[int]:
        """llama.cpp's SPM path: special tokens cut out, a space prefixed to text at the start or after a special
        token (add_space_prefix), spaces escaped as "▁", then spm_encode on each fragment."""
        out: list[int] = []
        prev_special = True
        for part in split_special(text, self._specials[special]):
            if isinstance(part, int):
                out.append(part)
                prev_special = True
                continue
            if self.add_space_prefix and prev_special:
                part = " " + part
            spm_encode(part.replace(" ", SPACE), self._index, self._scores, self._byte_ids, out)
            prev_special = False
        return out

    @staticmethod
    def _rstrip_patterns(kv: dict, tokens: list[str], types: list[int]) -> dict[bool, re.Pattern | None]:
        """llama.cpp gives phi-3's special tokens RSTRIP (by model name): ASCII whitespace after them is dropped.
        Done with a regex before encoding, since the tokenizers library would also strip Unicode spaces."""
        out: dict[bool, re.Pattern | None] = {False: None, True: None}
        if not any(s in str(kv.get("general.name", "")).lower() for s in ("phi-3", "phi3")):
            return out
        keep = {"<unk>", "<s>", "<|endoftext|>"}
        for special, kinds in ((False, (USER_DEFINED,)), (True, (USER_DEFINED, CONTROL, UNKNOWN))):
            names = sorted((t for t, ty in zip(tokens, types) if ty in kinds and t not in keep), key=len, reverse=True)
            if names:
                out[special] = re.compile("(" + "|".join(map(re.escape, names)) + ")[ \t\n\v\f\r]+")
        return out

    # --- encoding ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False,
               add_eos: bool | None = None) -> list[int]:
        """Token ids of `text`. special=False: special-token text (e.g. "<|im_start|>") is tokenized as plain text,
        as llama.cpp does with parse_special=false. add_bos/add_eos None: the GGUF's defaults."""
        _check_text(text)
        ids = self._text_ids(text, special)
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _text_ids(self, text: str, special: bool) -> list[int]:
        """The ids of the text alone (no BOS / EOS)."""
        if (strip := self._rstrip[special]) is not None:
            text = strip.sub(r"\1", text)
        if self._tk is None:
            return self._encode_spm(text, special)
        with self._lock:
            self._tk.encode_special_tokens = not special
            return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """Token ids of several texts without BOS/EOS (parallel in the Rust library)."""
        for t in texts:
            _check_text(t)
        if (strip := self._rstrip[special]) is not None:
            texts = [strip.sub(r"\1", t) for t in texts]
        if self._tk is None:
            return [self._encode_spm(t, special) for t in texts]
        with self._lock:
            self._tk.encode_special_tokens = not special
            return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]

    # --- decoding ----------------------------------------------------------------------------------------------
    def token_str(self, token_id: int) -> str:
        """The vocabulary entry as stored in the GGUF (e.g. "▁Hello", "ĠHello", "<0x0A>")."""
        return self.tokens[self._check_id(token_id)]

    def is_special(self, token_id: int) -> bool:
        return self.types[self._check_id(token_id)] in (CONTROL, UNKNOWN)

    def _check_id(self, token_id: int) -> int:
        if not isinstance(token_id, (int, np.integer)) or isinstance(token_id, bool) \
                or not 0 <= token_id < len(self.tokens):
            raise ValueError(f"token id {token_id!r} is not in the vocabulary (0..{len(self.tokens) - 1})")
        return token_id

    def is_eog(self, token_id: int) -> bool:
        return token_id in self.eog_ids

    def token_to_bytes(self, token_id: int, special: bool = False) -> bytes:
        """The bytes a token contributes to the text (llama_token_to_piece). Byte tokens give single, possibly
        partial UTF-8 bytes; control tokens give b"" unless special."""
        ty = self.types[self._check_id(token_id)]
        if ty in (CONTROL, UNKNOWN):
            return self.tokens[token_id].encode() if special else b""
        piece = self._pieces.get(token_id)
        if piece is None:
            piece = self._piece(token_id, ty)
            self._pieces[token_id] = piece
        return piece

    def _piece(self, token_id: int, ty: int) -> bytes:
        text = self.tokens[token_id]
        if ty == USER_DEFINED:
            return text.encode()
        if ty == NORMAL:
            if self.escaped_spaces:
                return text.replace(SPACE, " ").encode()
            dec = _BYTE_DECODER
            return b"".join(bytes((dec[c],)) if c in dec else c.encode() for c in text)
        if ty == BYTE:
            try:
                return bytes((int(text[3:-1], 16),))
            except ValueError:
                return text.encode()
        return b""  # unused / undefined: suppressed like control tokens

    def decode_bytes(self, ids: Iterable[int], special: bool = False) -> bytes:
        ids = list(ids)
        out = b"".join(self.token_to_bytes(i, special) for i in ids)
        if self._strips_first_space(ids) and out.startswith(b" "):
            out = out[1:]
        return out

    def decode(self, ids: Iterable[int], special: bool = False) -> str:
        """Text of `ids`: the concatenated pieces (invalid UTF-8 replaced). As llama-cpp-python, the space that
        SentencePiece prefixes to a sequence is dropped when the sequence starts with BOS."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def _strips_first_space(self, ids: list[int]) -> bool:
        return self.add_space_prefix and self.escaped_spaces and bool(ids) and ids[0] == self.bos_id

    def stream(self, special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, special)

    def __repr__(self) -> str:
        return f"Tokenizer(model={self.model!r}, pre={self.pre!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Incremental detokenizer: feed ids one at a time, get text only once the bytes form complete UTF-8.

    `"".join(d.add(i) for i in ids) + d.flush() == tokenizer.decode(ids)` for any ids."""

    def __init__(self, tokenizer: Tokenizer, special: bool = False):
        self.tokenizer = tokenizer
        self.special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self._strip = False

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly "" while a multi-byte character is incomplete)."""
        tok = self.tokenizer
        data = tok.token_to_bytes(token_id, self.special)
        if self._first:
            self._first = False
            self._strip = tok._strips_first_space([token_id])
        if self._strip and data:
            self._strip = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def feed(self, ids: Iterable[int]) -> Iterator[str]:
        for i in ids:
            if text := self.add(i):
                yield text

    def flush(self) -> str:
        """Whatever is held back at the end (incomplete UTF-8 becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
