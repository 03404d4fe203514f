"""npulm against llama.cpp (llama-cpp-python) on the real models: logits, perplexity, greedy continuations,
tokenization. Marked `oracle`; skipped when llama-cpp-python is not installed (CI installs it)."""

from __future__ import annotations

import numpy as np
import pytest

from npulm import assets
from npulm.api import Llama
from npulm.evaluate import divergence, perplexity

pytestmark = pytest.mark.oracle
llama_cpp = pytest.importorskip("llama_cpp")

from npulm.reference import LlamaCpp  # noqa: E402

MODELS = [assets.SMOLLM2, assets.GEMMA3]
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at a temperature of",
    "In 1969, the first humans to walk on the moon were",
    "The quick brown fox",
    "To make a cup of tea, you first",
    "Photosynthesis is the process by which",
    "The largest planet in our solar system is",
]


@pytest.fixture(scope="module", params=MODELS)
def pair(request):
    path = str(assets.model_path(request.param))
    ours = Llama(path, n_ctx=512, n_threads=2, verbose=False)
    theirs = LlamaCpp(path, n_ctx=512)
    yield request.param, ours, theirs
    del theirs


def test_logits_match_llama_cpp(pair, record_property):
    name, ours, theirs = pair
    tokens = theirs.tokenize(assets.lee_background().read_text(), add_bos=True)[:512]
    ref = theirs.logits(tokens)
    ours.reset()
    got = ours.session.eval(tokens, logits_from=0)
    d = divergence(ref, got)
    print(f"\n{name}: mean KL(llama.cpp || npulm) = {d.mean_kl:.5f}, top-1 = {100 * d.top1_rate:.1f} %")
    record_property("kl", d.mean_kl)
    assert d.mean_kl <= 0.01
    # One token is 0.2 % here and the rate's sampling noise ~1 %: kernel variants that all keep perplexity within
    # 0.2 % of the float path measured 94.9-97.9 %; a wrong kernel or layout lands far lower.
    assert d.top1_rate >= 0.94


def test_perplexity_within_1_percent(pair):
    name, ours, theirs = pair
    text = assets.lee_background().read_text()
    tokens = ours.tokenize(text, add_bos=True)
    assert tokens == theirs.tokenize(text, add_bos=True)
    bos = ours.token_bos() if ours.tokenizer.add_bos else None

    def eval_chunk(chunk, first):
        ours.reset()
        return ours.session.eval(chunk, logits_from=first)

    mine = perplexity(eval_chunk, tokens, 512, 8, bos_id=bos, progress=False, out=None)
    ref = theirs.perplexity(tokens, 8, bos)
    print(f"\n{name}: PPL npulm {mine.ppl:.4f} +/- {mine.stderr:.4f}, llama.cpp {ref.ppl:.4f} "
          f"({100 * (mine.ppl / ref.ppl - 1):+.2f} %)")
    assert len(mine.nll) == 8 * 255
    assert abs(mine.ppl / ref.ppl - 1) < 0.01


def test_greedy_continuations(pair):
    """Count identical 32-token greedy continuations; where one departs, llama.cpp must itself see a near-tie:
    it gives our token at least a quarter of its top token's probability (logit margin < ln 4), the mark of
    rounding noise (both engines quantize activations differently), not of a bug."""
    name, ours, theirs = pair
    same, margins = 0, []
    for prompt in PROMPTS:
        toks = ours.tokenize(prompt)
        assert toks == theirs.tokenize(prompt)
        logits = ours.session.prefill(toks)
        mine = []
        for _ in range(32):
            mine.append(int(np.argmax(logits)))
            logits = ours.session.eval([mine[-1]])[-1]
        ref = theirs.greedy(toks, 32)
        if mine == ref:
            same += 1
            continue
        i = next(i for i in range(32) if mine[i] != ref[i])
        cpp = theirs.logits(toks + ref[:i])[-1]
        margins.append(float(cpp.max() - cpp[mine[i]]))
    print(f"\n{name}: {same}/10 prompts give the same 32-token greedy continuation as llama.cpp; "
          f"llama.cpp logit margins where they part: {[round(m, 3) for m in margins]}")
    assert all(m < np.log(4) for m in margins)
