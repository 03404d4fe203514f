"""The continuous-batching engine without HTTP: prompt chunks do not stall decoding slots for more than one chunk,
a cancelled request frees its slot, the prefix cache picks the slot holding the longest prefix."""

from __future__ import annotations

import asyncio
import time

from npulm.api import Llama
from npulm.sampling import make_sampler
from npulm.server.engine import DoneEvent, Engine, GenRequest, TokenEvent


class Recorded:
    """The real model, with the rows of every forward_batch pass written down."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward_batch(self, token_lists, caches, logits_from=-1):
        self.passes.append([len(t) for t in token_lists])
        return self.model.forward_batch(token_lists, caches, logits_from)


def run(engine: Engine, reqs: list[GenRequest], cancel_after: dict[int, int] | None = None) -> list[list]:
    async def main():
        loop = asyncio.get_running_loop()
        outs = [[] for _ in reqs]

        async def one(i, req):
            req.loop, req.events = loop, asyncio.Queue()
            engine.submit(req)
            while True:
                e = await req.events.get()
                outs[i].append(e)
                if isinstance(e, TokenEvent) and cancel_after and len(outs[i]) == cancel_after.get(i):
                    req.cancel()
                if isinstance(e, DoneEvent):
                    return
        await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        return outs
    engine.start()
    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def greedy(prompt, n):
    return GenRequest(prompt, make_sampler(0.0), max_tokens=n)


def test_prompt_chunks_interleave_with_decoding(tiny_models):
    llm = Llama(str(tiny_models["llama"]), n_ctx=256, verbose=False)
    model = Recorded(llm.model)
    engine = Engine(model, llm.tokenizer, n_slots=2, n_chunk=8)
    short, long = llm.tokenize("the cat"), llm.tokenize("the hat in the cat " * 6)
    outs = run(engine, [greedy(short, 40), greedy(long, 4)])
    assert all(isinstance(o[-1], DoneEvent) for o in outs)
    assert max(max(p) for p in model.passes) <= 8  # no pass holds more than one chunk of a prompt
    # while the long prompt was prefilled chunk by chunk, the short request decoded in every step
    decode_steps = [p for p in model.passes if p == [1]]
    assert len(decode_steps) >= len(long) // 8 - 1


class Paced(Recorded):
    """The real model at a person's pace (5 ms a pass): a client's cancel lands long before 200 tokens are done,
    however busy the machine running the test is."""

    def forward_batch(self, token_lists, caches, logits_from=-1):
        time.sleep(0.005)
        return super().forward_batch(token_lists, caches, logits_from)


def test_cancel_frees_the_slot_and_queue_drains(tiny_models):
    llm = Llama(str(tiny_models["llama"]), n_ctx=256, verbose=False)
    engine = Engine(Paced(llm.model), llm.tokenizer, n_slots=1, n_chunk=8)
    prompt = llm.tokenize("the cat")
    outs = run(engine, [greedy(prompt, 200), greedy(prompt, 3)], cancel_after={0: 2})
    assert outs[0][-1].reason == "cancelled" and outs[0][-1].n_gen < 200
    assert outs[1][-1].n_gen <= 3 and engine.busy == 0


def test_prefix_cache_picks_the_slot_with_the_longest_prefix(tiny_models):
    llm = Llama(str(tiny_models["llama"]), n_ctx=256, verbose=False)
    engine = Engine(llm.model, llm.tokenizer, n_slots=3, n_chunk=64)
    a, b = llm.tokenize("the cat in the hat"), llm.tokenize("a hat on the cat in a")
    first = run(engine, [greedy(a, 5), greedy(b, 5)])
    again = run(engine, [greedy(b + llm.tokenize("the"), 5)])[0][-1]
    assert again.n_cached == len(b) and engine.prefix_hits >= 1
    same = run(engine, [greedy(a, 5)])[0]
    assert [e.token for e in same[:-1]] == [e.token for e in first[0][:-1]]  # cached prefix: the same reply


def test_rows_kernel_is_scoped_to_a_pass():
    from npulm.cpu import _kernels
    from npulm.server.engine import rows_kernel

    if _kernels is None:
        return
    default = _kernels.get_gemm_min_m()
    with rows_kernel(default + 4):
        assert _kernels.get_gemm_min_m() == default + 5
    assert _kernels.get_gemm_min_m() == default


def test_prompt_lookup_in_the_slots_changes_no_reply(tiny_models):
    """Slots that speculate (prompt lookup, drafts verified with the other slots' rows in one pass) give every
    request the tokens it gets without speculation, greedy and seeded; drafts were verified and kept."""
    from npulm.speculative import PromptLookup, Speculator

    llm = Llama(str(tiny_models["llama-q8_0"]), n_ctx=256, verbose=False)  # C kernels: row-exact passes
    prompts = [llm.tokenize(t) for t in ("the cat in the hat", "in the cat the hat the", "a b c a b c a b", "the")]

    def requests():
        return [greedy(p, 30) for p in prompts] + [GenRequest(prompts[0], make_sampler(0.9, seed=5), max_tokens=30)]

    plain = run(Engine(llm.model, llm.tokenizer, n_slots=3), requests())
    speculators = []

    def make():
        speculators.append(Speculator(PromptLookup(), draft_max=6))
        return speculators[-1]

    model = Recorded(llm.model)
    spec = run(Engine(model, llm.tokenizer, n_slots=3, speculator=make), requests())
    tokens = [[e.token for e in out if isinstance(e, TokenEvent)] for out in plain]
    assert [[e.token for e in out if isinstance(e, TokenEvent)] for out in spec] == tokens
    assert [out[-1].reason for out in spec] == [out[-1].reason for out in plain]
    assert sum(s.stats.accepted for s in speculators) > 0  # drafts were kept, not only proposed
    assert any(rows > 1 for p in model.passes for rows in p)  # a slot's row carried drafts
