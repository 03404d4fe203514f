"""Speculative decoding: greedy output and final cache identical to plain decoding, the sampled distribution equal to
the target's (chi-square over many seeds), prompt lookup, the draft-length controller, the CLI and API hooks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from scipy.stats import chisquare

from npulm import assets
from npulm.generate import Session, generate
from npulm.gguf import GGUFFile
from npulm.models import load_model
from npulm.sampling import make_sampler
from npulm.speculative import (
    CallableDrafter,
    Draft,
    DraftLength,
    DraftModel,
    PromptLookup,
    Speculator,
    check_vocab,
    exact_rows,
    make_speculator,
    verify,
)


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_model_writer):
    """A tiny Q8_0 target (C kernels: row-exact) and a Q4_0 draft of the same weights (agrees often, not always)."""
    d, write_tiny_model = tmp_path_factory.mktemp("spec"), tiny_model_writer
    target = load_model(GGUFFile(str(write_tiny_model(d / "t.gguf", "llama", T.Q8_0, n_ctx=96))), 96)
    draft = load_model(GGUFFile(str(write_tiny_model(d / "d.gguf", "llama", T.Q4_0, n_ctx=96))), 96)
    other = load_model(GGUFFile(str(write_tiny_model(d / "o.gguf", "llama", T.Q8_0, n_ctx=96, n_layer=1))), 96)
    return target, draft, other


def cache_state(session: Session) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tuple(a.copy() for a in layer.state) for layer in session.cache]


def run(model, prompt, sampler, max_tokens, speculator=None, stop=()):
    session = Session(model)
    out = list(generate(session, prompt, sampler, max_tokens, stop, speculator))
    return out, session


def assert_same_run(a, b):
    (out_a, sa), (out_b, sb) = a, b
    assert out_a == out_b
    assert sa.tokens == sb.tokens
    for (ka, va), (kb, vb) in zip(cache_state(sa), cache_state(sb), strict=True):
        assert np.array_equal(ka, kb) and np.array_equal(va, vb)


def test_exact_rows_probe(pair, tiny_models):
    target, *_ = pair
    assert exact_rows(target) >= 2  # the C row kernels
    f32 = load_model(GGUFFile(str(tiny_models["llama"])), 64)
    assert exact_rows(f32) == 1  # BLAS over float weights: not row-exact, so no speculation


def test_prompt_lookup():
    lookup = PromptLookup(max_ngram_size=3, num_pred_tokens=4)
    assert lookup.draft([1, 2, 3, 4, 5, 6, 2, 3], 10).tokens == [4, 5, 6, 2]
    assert lookup.draft([1, 2, 3, 4, 5, 6, 2, 3], 2).tokens == [4, 5]
    # the longest n-gram wins over a later shorter match; among equals the latest occurrence
    assert lookup.draft([7, 8, 9, 1, 8, 9, 2, 5, 8, 9], 1).tokens == [2]
    assert lookup.draft([1, 7, 8, 9, 4, 0, 8, 9, 5, 7, 8, 9], 1).tokens == [4]
    assert lookup.draft([1, 2, 3], 4).tokens == []
    assert list(lookup(np.array([5, 6, 5]))) == [6, 5]  # llama-cpp-python's call


def test_prompt_lookup_index_follows_the_text():
    """The lookup's n-gram index grows with the text, and is rebuilt when the text is rolled back or replaced: it
    proposes what a search of the whole text proposes, step after step."""

    def search(ids: list[int], n: int, max_size: int) -> list[int]:
        for size in range(min(max_size, len(ids) - 1), 0, -1):
            starts = [i for i in range(len(ids) - size) if ids[i:i + size] == ids[-size:]]
            if starts:
                return ids[starts[-1] + size:starts[-1] + size + n]
        return []

    rng = np.random.default_rng(3)
    for _ in range(100):
        size, n = int(rng.integers(1, 5)), int(rng.integers(1, 8))
        lookup, ids = PromptLookup(max_ngram_size=size, num_pred_tokens=n), rng.integers(0, 6, 5).tolist()
        for _ in range(30):
            assert lookup.draft(ids, 16).tokens == search(ids, n, size)
            r = rng.random()
            if r < 0.2:
                ids = ids[:int(rng.integers(0, len(ids) + 1))]  # rolled back
            elif r < 0.25:
                ids = rng.integers(0, 6, 8).tolist()  # another text
            else:
                ids = ids + rng.integers(0, 6, int(rng.integers(1, 4))).tolist()


@pytest.mark.parametrize("draft_max", [1, 3, 6])
def test_greedy_identical_lookup(pair, draft_max):
    target, *_ = pair
    rng = np.random.default_rng(draft_max)
    for _ in range(4):
        base = rng.integers(5, 300, 6).tolist()
        prompt = [1, *base, *base, *base[:3]]  # repeats: lookup finds drafts
        plain = run(target, prompt, make_sampler(0), 40)
        spec = Speculator(PromptLookup(), draft_max=draft_max, adaptive=False)
        assert_same_run(plain, run(target, prompt, make_sampler(0), 40, spec))
        assert spec.stats.proposed > 0


@pytest.mark.parametrize("draft_max", [2, 5])
def test_greedy_identical_draft_model_and_rollback(pair, draft_max):
    target, draft, _ = pair
    spec = Speculator(DraftModel(draft, p_min=0.0), draft_max=draft_max, adaptive=False)
    for seed in range(3):
        prompt = [1, *np.random.default_rng(seed).integers(5, 300, 8).tolist()]
        assert_same_run(run(target, prompt, make_sampler(0), 30), run(target, prompt, make_sampler(0), 30, spec))
    s = spec.stats
    assert 0 < s.accepted < s.proposed  # both kept and rolled-back drafts happened


def test_end_states_match_plain(pair):
    """EOG, max_tokens and a full context leave the session as plain decoding does."""
    target, *_ = pair
    prompt = [1, 20, 30, 40, 20, 30]
    plain_out, _ = run(target, prompt, make_sampler(0), 20)
    stop = {plain_out[5]}
    first = plain_out.index(plain_out[5])
    for max_tokens, stops in ((20, ()), (7, ()), (20, stop), (None, ())):  # None: until the context is full
        spec = Speculator(CallableDrafter(lambda ids: plain_out[:3] + [7, 7]), draft_max=6, adaptive=False)
        a = run(target, prompt, make_sampler(0), max_tokens, None, stops)
        b = run(target, prompt, make_sampler(0), max_tokens, spec, stops)
        assert_same_run(a, b)
        if stops:
            assert len(a[0]) == first


def test_seeded_sampling_identical_with_deterministic_drafts(pair):
    """With a deterministic drafter each emitted token is the sampler's own draw: same seed, same text."""
    target, *_ = pair
    prompt = [1, 9, 8, 7, 9, 8]
    for seed in range(3):
        spec = Speculator(PromptLookup(2), draft_max=6, adaptive=False)
        assert_same_run(run(target, prompt, make_sampler(1.0, seed=seed), 30),
                        run(target, prompt, make_sampler(1.0, seed=seed), 30, spec))


def exact_joint(model, prompt, sampler_args, n):
    """P(first n tokens) under the target sampler, by enumeration."""
    dist = make_sampler(**sampler_args).distribution
    s = Session(model)
    out = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, p in out.items():
            ids, probs = dist(s.prefill([*prompt, *seq]), [*prompt, *seq])
            nxt.update({(*seq, t): p * q for t, q in zip(ids.tolist(), probs)})
        out = nxt
    return out


@pytest.mark.parametrize("kind", ["lookup", "draft-model"])
def test_sampled_distribution_is_the_targets(pair, kind):
    """Chi-square over many seeds: the first three tokens of speculative sampling follow the target's distribution,
    for deterministic proposals and for proposals drawn from the draft model's own distribution."""
    target, _, other = pair
    prompt = [1, 40, 41, 42, 40]
    args = dict(temperature=1.5, top_k=3, top_p=1.0, min_p=0.0)
    expected = exact_joint(target, prompt, args, 3)
    keys = sorted(expected)
    if kind == "lookup":  # a deterministic proposal: the target's own greedy continuation
        greedy = Session(target)

        def propose(ids):
            out = [int(np.argmax(greedy.prefill(list(ids))))]
            return [*out, int(np.argmax(greedy.prefill([*ids, *out])))]

        drafter = CallableDrafter(propose)
    else:  # the target without its last block: proposals drawn from its own, often different, distribution
        drafter = DraftModel(other, p_min=0.0)
    spec = Speculator(drafter, draft_max=2, adaptive=False)
    session = Session(target)
    counts = dict.fromkeys(keys, 0)
    n = 2000
    for seed in range(n):
        out = list(generate(session, prompt, make_sampler(**args, seed=seed), 3, (), spec))
        counts[tuple(out)] += 1
    f_exp = np.array([expected[k] for k in keys])
    f_obs = np.array([counts[k] for k in keys])
    assert f_obs.sum() == n
    assert chisquare(f_obs, f_exp / f_exp.sum() * n).pvalue > 1e-3
    assert 0 < spec.stats.accepted < spec.stats.proposed


def test_verify_rolls_back_without_recomputation(pair):
    target, *_ = pair
    session = Session(target)
    session.prefill([1, 5, 6, 7])
    plain = Session(target)
    plain.prefill([1, 5, 6, 7])
    nxt = int(np.argmax(plain.eval([8])[-1]))
    out = verify(session, 8, Draft([(nxt + 1) % 300, 3, 4]), make_sampler(0))
    assert out == [nxt]  # first draft rejected: the target's own token comes back
    assert session.tokens == plain.tokens == [1, 5, 6, 7, 8]
    for (ka, va), (kb, vb) in zip(cache_state(session), cache_state(plain)):
        assert np.array_equal(ka, kb) and np.array_equal(va, vb)


def test_draft_length_never_beats_plain_when_passes_cost():
    c = DraftLength(k_max=6)
    for m in range(1, 8):  # each extra row costs as much as a token: drafts never pay
        c.observe(m, float(m), m - 1, 0)
    assert c.choose() == 0
    c = DraftLength(k_max=6)
    for _ in range(20):
        for m in range(1, 8):  # nearly flat pass cost and every draft accepted: the longest draft
            c.observe(m, 1.0 + 0.01 * m, m - 1, m - 1)
    assert c.choose() == 6
    c = DraftLength(k_max=6, pass_cost=lambda m: 1.0 if m <= 4 else 3.0)  # a modeled cost (the NPU's)
    c.counts[None] = [9.0, 10.0]
    assert c.choose() == 3
    c = DraftLength(k_max=6, pass_cost=lambda m: 1.0 + 0.3 * (m - 1), probe_every=4)
    for _ in range(30):  # 3-gram lookups are right, 1-gram ones are not: only the first kind is drafted
        c.observe(4, 1.9, 3, 3, key=3)
        c.observe(2, 1.3, 1, 0, key=1)
    assert c.choose(6, key=3) == 6
    assert [c.choose(6, key=1) for _ in range(4)] == [0, 0, 0, 1]  # a probe after probe_every plain steps


def test_draft_length_timing_probes_and_backoff():
    c = DraftLength(k_max=6, probe_every=4)
    c.observe(1, 1.0, 0, 0)
    assert c.pass_seconds(3) == 3.0  # one point: an unexplored M is priced as M single passes, not guessed cheap
    c.observe(2, 1.2, 1, 1)
    assert abs(c.pass_seconds(5) - 1.8) < 1e-9  # beyond: the slope of the last two measured
    c.observe(2, 5.0, 0, 0)  # a pass delayed by another process: drifts in slowly
    assert c.pass_seconds(2) < 1.4
    c.observe(2, 1.1, 0, 0)  # a faster one counts at once
    assert c.pass_seconds(2) == 1.1
    # a kind whose probes fail waits twice as long before the next one
    c = DraftLength(k_max=6, pass_cost=lambda m: float(m), probe_every=4)
    waits = []
    for _ in range(3):
        n = 1
        while c.choose(6, key=1) == 0:
            n += 1
        waits.append(n)
        c.observe(2, 2.0, 1, 0, key=1)
    assert waits == [4, 8, 16]
    c.observe(2, 2.0, 1, 1, key=1)  # (a drafted step, not a probe: the wait stays)
    assert c.probe_wait[1] == 32
    # with a good kind, the longest draft now and then times the far end of the pass cost
    c = DraftLength(k_max=6, pass_cost=lambda m: 1.0 if m <= 2 else 9.0, probe_every=4)
    c.counts[3] = [9.0, 10.0]
    assert [c.choose(6, key=3) for _ in range(4)] == [1, 1, 1, 6]


def test_vocab_check_and_llama_hooks(tiny_model_writer, tmp_path):
    with pytest.raises(ValueError, match="differs from the target's at token 2"):
        check_vocab(["a", "b", "c"], ["a", "b", "x"])
    from npulm.api import Llama

    path = tiny_model_writer(tmp_path / "q8.gguf", "llama", T.Q8_0)
    llm = Llama(str(path), n_ctx=64, verbose=False)
    plain = llm("the the the", max_tokens=20, temperature=0)["choices"][0]["text"]
    for draft in (PromptLookup(), str(path), Llama(str(path), n_ctx=64, verbose=False), lambda ids: [5, 6]):
        spec_llm = Llama(str(path), n_ctx=64, verbose=False, draft_model=draft)
        assert spec_llm("the the the", max_tokens=20, temperature=0)["choices"][0]["text"] == plain
    with pytest.raises(ValueError, match="draft_model must be"):
        make_speculator(3)


def test_cli_run_spec_lookup(tiny_model_writer, tmp_path, capsys):
    from npulm.cli import main

    path = tiny_model_writer(tmp_path / "q8.gguf", "llama", T.Q8_0)
    outs = []
    for extra in ([], ["--spec", "lookup"], ["-md", str(path), "--draft-max", "3"]):
        assert main(["run", "-m", str(path), "-p", "the the", "-n", "16", "--temp", "0", "-c", "64", *extra]) == 0
        outs.append(capsys.readouterr())
    assert outs[0].out == outs[1].out == outs[2].out
    assert "speculative:" in outs[1].err
    assert main(["run", "-m", str(path), "--spec", "lookup", "-md", str(path)]) == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", [assets.SMOLLM2, assets.GEMMA3])
def test_greedy_identical_real_models(name):
    """Many prompts (input-grounded and free) and draft lengths: token for token what plain decoding gives."""
    from npulm.api import Llama

    llm = Llama(name, n_ctx=1024, verbose=False)
    text = assets.lee_background().read_text(encoding="utf-8").splitlines()
    prompts = [f"Repeat this text:\n{text[i][:400]}\nRepeated:\n{text[i][:40]}" for i in range(0, 40, 8)]
    prompts += ["def add(a, b):\n    return a + b\n\ndef sub(a, b):\n", "The capital of France is"]
    for i, prompt in enumerate(prompts):
        tokens = llm.tokenize(prompt)
        plain = run(llm.model, tokens, make_sampler(0), 48)
        draft_max = (1, 3, 6)[i % 3]
        spec = Speculator(PromptLookup(), draft_max=draft_max, adaptive=False)
        assert_same_run(plain, run(llm.model, tokens, make_sampler(0), 48, spec))


def test_bench_spec_rows(tiny_model_writer, tmp_path, capsys):
    import json

    from npulm.cli import main

    path = tiny_model_writer(tmp_path / "q8.gguf", "llama", T.Q8_0)
    assert main(["bench", "-m", str(path), "-p", "0", "-n", "8", "-r", "1", "--spec", "lookup", "-o", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["speculative"] for r in rows] == ["", "text", "text+PromptLookup"]
    assert all(r["avg_ts"] > 0 and r["n_gen"] == 8 for r in rows)
