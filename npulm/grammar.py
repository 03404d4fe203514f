"""Constrained decoding: JSON schemas, `json_object`, llama.cpp GBNF grammars, Lark and regexes become a token mask
that the sampler applies before anything else (npulm/sampling.py's TokenConstraint).

The engine is llguidance, chosen by measurement (benchmarks/grammar_mask.py, table in the README): on Gemma-3's
262k vocabulary llguidance's and xgrammar's per-token masks are far below a tenth of a decode step (xgrammar's is
the fastest), so the choice rests on the rest: llguidance compiles a schema in milliseconds (xgrammar: over a
second, outlines-core: minutes, per schema, and a server meets a new one per request), imports nothing else
(xgrammar imports torch and transformers) and reads llama.cpp's GBNF, so `grammar=` strings written for
llama-cpp-python keep working.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

try:
    import llguidance
except ImportError:  # an optional extra: `pip install npulm[grammar]`
    llguidance = None

from .tokenizer import Tokenizer

# llama.cpp's JSON grammar separators; no free whitespace and no \uXXXX escapes (text is written as UTF-8): small
# models otherwise fill max_tokens with newlines or with six-token escapes of control characters
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": ",
                "json_allowed_escapes": "\"\\bfnrt"}


class GrammarError(ValueError):
    """A grammar or schema that cannot be compiled, named with the reason."""


def _require() -> None:
    if llguidance is None:
        raise ImportError("structured output (response_format, grammar, tool_choice) needs llguidance: "
                          "pip install 'npulm[grammar]'")


class TokenizerAdapter:
    """What llguidance's TokenizerWrapper reads from a tokenizer: every token's bytes, the special ids, EOS and an
    encoder. Ids past the tokenizer's vocabulary (padded output rows) are empty special tokens that never match."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_to_bytes(i, special=True) if i < n else b"" for i in range(n_vocab)]
        self.special_token_ids = [i for i in range(n_vocab) if i >= n or tokenizer.is_special(i)]
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer
        special = set(self.special_token_ids)
        self._by_bytes = {b: i for i, b in reversed(list(enumerate(self.tokens))) if b and i not in special}
        self._longest = max(map(len, self._by_bytes), default=1)

    def __call__(self, text: str) -> list[int]:
        """Tokens spelling exactly `text` (llguidance tokenizes forced text with this). SentencePiece vocabularies
        prefix a space at the start of a text; then a greedy longest match over the vocabulary spells it instead."""
        ids = self._tokenizer.encode(text, add_bos=False)
        want = text.encode()
        if b"".join(self.tokens[i] for i in ids) == want:
            return ids
        out, pos = [], 0
        while pos < len(want):
            for n in range(min(self._longest, len(want) - pos), 0, -1):
                tok = self._by_bytes.get(want[pos:pos + n])
                if tok is not None:
                    out.append(tok)
                    pos += n
                    break
            else:
                raise ValueError(f"the vocabulary cannot spell byte {want[pos]:#x}")
        return out


def make_lltokenizer(tokenizer: Tokenizer, n_vocab: int):
    """llguidance's view of a vocabulary (a few hundred ms for 262k tokens: build once per model). Every
    end-of-generation token may end a grammar."""
    _require()
    wrapper = llguidance.TokenizerWrapper(TokenizerAdapter(tokenizer, n_vocab))
    eog = sorted(t for t in tokenizer.eog_ids if t < n_vocab) or [tokenizer.eos_id]
    return llguidance.LLTokenizer(wrapper, n_vocab=n_vocab, eos_token=eog)


def json_schema_grammar(schema: Mapping[str, Any] | str | None) -> str:
    """A grammar for JSON matching `schema` (None: any JSON object, as response_format json_object)."""
    _require()
    if schema is None:
        schema = {"type": "object"}
    if isinstance(schema, str):
        schema = json.loads(schema)
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(closed_objects(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"JSON schema not supported: {e}") from None


def closed_objects(schema: Any) -> Any:
    """Objects with listed properties and no `additionalProperties` get none, as llama.cpp's schema converter (and
    OpenAI's strict mode) do: JSON Schema's default would let a small model invent keys until max_tokens."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, Mapping):
        return schema
    out = {k: (closed_objects(v) if k != "properties" else {n: closed_objects(p) for n, p in v.items()})
           for k, v in schema.items()} if isinstance(schema.get("properties", {}), Mapping) else dict(schema)
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def gbnf_grammar(text: str) -> str:
    """A llama.cpp GBNF grammar (or Lark text) as an llguidance grammar."""
    _require()
    from llguidance.gbnf_to_lark import any_to_lark

    try:
        return llguidance.LLMatcher.grammar_from_lark(any_to_lark(text))
    except (ValueError, IndexError, KeyError) as e:
        raise GrammarError(f"grammar does not parse: {e}") from None


def lark_grammar(text: str) -> str:
    """llguidance's Lark dialect (with `%json {schema}` rules)."""
    _require()
    try:
        return llguidance.LLMatcher.grammar_from_lark(text)
    except ValueError as e:
        raise GrammarError(f"grammar does not parse: {e}") from None


def regex_grammar(pattern: str) -> str:
    _require()
    return llguidance.LLMatcher.grammar_from_regex(pattern)


def response_format_grammar(response_format: Mapping[str, Any] | None) -> str | None:
    """OpenAI's response_format: {"type": "text"} (none), {"type": "json_object"[, "schema": {...}]} (llama-cpp-python
    accepts a schema there) or {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}."""
    if not response_format:
        return None
    if not isinstance(response_format, Mapping) or "type" not in response_format:
        raise ValueError("response_format must be a dict with a 'type' (text, json_object or json_schema)")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar(response_format.get("schema"))
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ValueError("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}")
        return json_schema_grammar(spec.get("schema") or None)
    raise ValueError(f"response_format type {kind!r} is not one of text, json_object, json_schema")


class GrammarConstraint:
    """One generation's grammar state (sampling.TokenConstraint): the mask of allowed tokens, advanced by each
    accepted token. Checked when made: a grammar that does not compile raises GrammarError."""

    def __init__(self, lltokenizer, grammar: str):
        _require()
        ok, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltokenizer)
        if ok is True:  # is_error
            raise GrammarError(f"grammar rejected: {messages[0] if messages else 'unknown error'}")
        self.matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise GrammarError(f"grammar rejected: {self.matcher.get_error()}")
        self.n_vocab = lltokenizer.vocab_size
        self._bits = np.zeros((self.n_vocab + 31) // 32, np.int32)

    def allowed(self, n_vocab: int) -> np.ndarray | None:
        if self.matcher.is_error():
            raise GrammarError(f"grammar state: {self.matcher.get_error()}")
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        mask = np.unpackbits(self._bits.view(np.uint8), bitorder="little", count=self.n_vocab).view(bool)
        if n_vocab > self.n_vocab:
            mask = np.concatenate([mask, np.zeros(n_vocab - self.n_vocab, bool)])
        return mask[:n_vocab]

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def done(self) -> bool:
        return self.matcher.is_accepting()


class LlamaGrammar:
    """llama-cpp-python's grammar object: `LlamaGrammar.from_string(gbnf)`, `from_file(path)`,
    `from_json_schema(json_text)`; pass it as `grammar=`."""

    def __init__(self, grammar: str, source: str = ""):
        self.grammar, self._grammar = grammar, source

    @classmethod
    def from_string(cls, grammar: str, verbose: bool = True) -> LlamaGrammar:
        return cls(gbnf_grammar(grammar), grammar)

    @classmethod
    def from_file(cls, file: str, verbose: bool = True) -> LlamaGrammar:
        with open(file, encoding="utf-8") as f:
            return cls.from_string(f.read())

    @classmethod
    def from_json_schema(cls, json_schema: str, verbose: bool = True) -> LlamaGrammar:
        schema = json.loads(json_schema) if isinstance(json_schema, str) else json_schema
        return cls(json_schema_grammar(schema), json.dumps(schema))


def as_grammar(grammar: LlamaGrammar | str | None) -> str | None:
    """The `grammar=` keyword: a LlamaGrammar, or GBNF / Lark text."""
    if grammar is None or isinstance(grammar, LlamaGrammar):
        return grammar.grammar if grammar is not None else None
    if isinstance(grammar, str):
        return gbnf_grammar(grammar)
    raise ValueError(f"grammar must be a LlamaGrammar or a GBNF string, got {type(grammar).__name__}")
