"""Per-token cost of a constrained-decoding mask on a real vocabulary, for the engines npulm could use, against one
decode step of the same model, in one run:

    python benchmarks/grammar_mask.py [--model gemma3-270m] [--xgrammar-python PATH]

For each engine: one-time vocabulary setup, schema compile time, and the mean / p95 time per token of computing the
mask while walking a valid JSON document token by token (the document is tokenized by the model's tokenizer), and
the same as a share of a decode step (`Llama.eval` of one token, median of 10). llguidance's row also shows the
cost as npulm's sampler pays it (mask unpacked to one bool per token).

xgrammar imports torch and transformers; where they are not installed, point --xgrammar-python at an interpreter
that has them (the row then runs in that process; otherwise it shows the import error). The machine's load average
is printed: on a shared machine every figure is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "email": {"type": "string"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 8},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"]},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "scores", "address", "active"],
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@analytical.engine", "role": "admin",
            "scores": [0.25, 0.5, 0.75], "address": {"street": "12 St James's Square", "city": "London",
                                                      "zip": "10001"}, "active": True}


def stats(times: list[float]) -> tuple[float, float]:
    t = sorted(times)
    return statistics.fmean(t) * 1e6, t[int(0.95 * (len(t) - 1))] * 1e6


def bench_llguidance(tokenizer, n_vocab: int, doc_tokens: list[int]) -> dict:
    import llguidance

    from npulm import grammar

    t0 = time.perf_counter()
    lltok = grammar.make_lltokenizer(tokenizer, n_vocab)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    c = grammar.GrammarConstraint(lltok, grammar.json_schema_grammar(SCHEMA))
    compile_s = time.perf_counter() - t0
    raw, full = [], []
    bits = np.zeros((n_vocab + 31) // 32, np.int32)
    for tok in doc_tokens:
        t0 = time.perf_counter()
        c.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        t1 = time.perf_counter()
        mask = c.allowed(n_vocab)  # computes again, then unpacks: what the sampler sees
        t2 = time.perf_counter()
        raw.append(t1 - t0)
        full.append(t2 - t1)
        assert mask[tok], f"llguidance rejects token {tok} of the document"
        c.accept(tok)
    return {"engine": f"llguidance {llguidance.__version__}", "setup_s": setup, "compile_s": compile_s,
            "mask": stats(raw), "npulm": stats(full)}


def bench_outlines(tokenizer, n_vocab: int, doc_tokens: list[int]) -> dict:
    from importlib.metadata import version

    import outlines_core

    from npulm.grammar import TokenizerAdapter

    t0 = time.perf_counter()
    ad = TokenizerAdapter(tokenizer, n_vocab)
    eos = tokenizer.eos_id
    vocab_map: dict[bytes, list[int]] = {}
    for i, b in enumerate(ad.tokens):
        if b and i != eos and i not in set(ad.special_token_ids):
            vocab_map.setdefault(b, []).append(i)
    vocab = outlines_core.Vocabulary(eos, vocab_map)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(SCHEMA))
    index = outlines_core.Index(regex, vocab)
    guide = outlines_core.Guide(index)
    compile_s = time.perf_counter() - t0
    mask = np.zeros((n_vocab + 31) // 32, np.int32)
    times = []
    for tok in doc_tokens:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, mask.itemsize)
        times.append(time.perf_counter() - t0)
        assert (mask[tok >> 5] >> (tok & 31)) & 1, f"outlines-core rejects token {tok} of the document"
        guide.advance(tok)
    return {"engine": f"outlines-core {version('outlines-core')}", "setup_s": setup, "compile_s": compile_s,
            "mask": stats(times)}


XGRAMMAR_CHILD = r"""
import json, sys, time, statistics
import xgrammar as xgr, torch
from importlib.metadata import version
tokens, eos, n_vocab, doc, schema = json.loads(sys.stdin.read())
enc = [bytes.fromhex(t) for t in tokens]
t0 = time.perf_counter()
info = xgr.TokenizerInfo(enc, vocab_type=xgr.VocabType.RAW, vocab_size=n_vocab, stop_token_ids=[eos])
compiler = xgr.GrammarCompiler(info)
setup = time.perf_counter() - t0
t0 = time.perf_counter()
compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
matcher = xgr.GrammarMatcher(compiled)
compile_s = time.perf_counter() - t0
bitmask = xgr.allocate_token_bitmask(1, n_vocab)
times = []
for tok in doc:
    t0 = time.perf_counter()
    matcher.fill_next_token_bitmask(bitmask)
    times.append(time.perf_counter() - t0)
    assert matcher.accept_token(tok), tok
print(json.dumps({"engine": "xgrammar " + version("xgrammar"), "setup_s": setup, "compile_s": compile_s,
                  "times": times}))
"""


def bench_xgrammar(tokenizer, n_vocab: int, doc_tokens: list[int], python: str) -> dict:
    from npulm.grammar import TokenizerAdapter

    ad = TokenizerAdapter(tokenizer, n_vocab)
    payload = json.dumps([[t.hex() for t in ad.tokens], tokenizer.eos_id, n_vocab, doc_tokens, SCHEMA])
    r = subprocess.run([python, "-c", XGRAMMAR_CHILD], input=payload, capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["failed"])[-1]
        return {"engine": "xgrammar", "error": last[:100]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["mask"] = stats(out.pop("times"))
    return out


def decode_step_us(llm) -> float:
    llm.reset()
    llm.eval(llm.tokenize("The quick brown fox jumps over the lazy dog. " * 4))
    times = []
    for i in range(10):
        t0 = time.perf_counter()
        llm.eval([100 + i])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--xgrammar-python", default=sys.executable)
    ap.add_argument("--engines", default="llguidance,outlines-core,xgrammar")
    args = ap.parse_args()
    from npulm.api import Llama

    llm = Llama(args.model, n_ctx=512, verbose=False)
    n_vocab = llm.n_vocab()
    doc_tokens = llm.tokenize(json.dumps(DOCUMENT), add_bos=False)
    step = decode_step_us(llm)
    print(f"model {Path(llm.model_path).name}: vocabulary {n_vocab}, decode step {step / 1e3:.1f} ms (median of 10), "
          f"document {len(doc_tokens)} tokens; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    rows = []
    for name in args.engines.split(","):
        try:
            if name == "llguidance":
                rows.append(bench_llguidance(llm.tokenizer, n_vocab, doc_tokens))
            elif name == "outlines-core":
                rows.append(bench_outlines(llm.tokenizer, n_vocab, doc_tokens))
            elif name == "xgrammar":
                rows.append(bench_xgrammar(llm.tokenizer, n_vocab, doc_tokens, args.xgrammar_python))
        except Exception as e:  # an engine that fails is a row with its error, not the end of the table
            rows.append({"engine": name, "error": f"{type(e).__name__}: {e}"[:100]})
    print("| engine | vocabulary setup (s) | schema compile (s) | mask mean (us) | mask p95 (us) "
          "| mean / decode step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | {r['error']} | | | | |")
            continue
        mean, p95 = r["mask"]
        print(f"| {r['engine']} | {r['setup_s']:.2f} | {r['compile_s']:.3f} | {mean:.0f} | {p95:.0f} | "
              f"{100 * mean / step:.1f} % |")
        if "npulm" in r:
            mean, p95 = r["npulm"]
            print(f"| {r['engine']} + unpack (npulm's sampler) | | | {mean:.0f} | {p95:.0f} "
                  f"| {100 * mean / step:.1f} % |")


if __name__ == "__main__":
    main()
