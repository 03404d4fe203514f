"""A seeded, bounded GGUF fuzz run (issue 14): mutated files through the reader, the tokenizer builder, the chat
template, a full load and a forward pass. Every case must load or fail with a clean one-line error (GGUFError or a
ValueError raised by npulm), within a time limit. benchmarks/fuzz.py runs the same cases at length, in subprocesses
that also catch crashes."""

from __future__ import annotations

import collections
import signal

import pytest
from fuzzing import ACCEPTED, CLEAN, HANG, OTHER, gpt2_variant, mutate, run_case, serialize, spec_from_file

CASES = 2000
CASE_SECONDS = 10  # far above any case (~15 ms; a hostile template stops at 0.1 s): only a real hang reaches it


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


@pytest.fixture(scope="module")
def bases(tiny_models):
    specs = [spec_from_file(tiny_models[a]) for a in ("llama", "qwen2", "gemma3", "llama-q4_0")]
    return [*specs, gpt2_variant(specs[0])]


def test_base_files_load_and_run(bases, tmp_path):
    for spec in bases:
        path = tmp_path / "base.gguf"
        path.write_bytes(serialize(spec))
        assert run_case(path) == (ACCEPTED, "forward", "")


def test_mutated_ggufs_load_or_fail_cleanly(bases, tmp_path):
    path = tmp_path / "case.gguf"
    outcomes, stages, failures = collections.Counter(), collections.Counter(), []
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for seed in range(CASES):
            data, family = mutate(bases, seed)
            path.write_bytes(data)
            signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS)
            try:
                outcome, stage, message = run_case(path, template_seconds=0.1)
            except _Hang:
                outcome, stage, message = HANG, "?", f"no result in {CASE_SECONDS} s"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            outcomes[outcome] += 1
            stages[outcome, stage] += 1
            if outcome in (OTHER, HANG) or stage == "forward" and outcome == CLEAN:  # bad files fail at load
                failures.append(f"seed {seed} ({family}, {stage}, {outcome}): {message}")
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(dict(outcomes), dict(stages))
    assert not failures, "\n".join(failures[:20])
    assert outcomes[ACCEPTED] > CASES // 20 and outcomes[CLEAN] > CASES // 2  # the mutations reach every stage
    assert all(stages[CLEAN, s] for s in ("reader", "tokenizer", "template", "load"))
