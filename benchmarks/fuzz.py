"""Long GGUF fuzz runs: the seeded cases of tests/fuzzing.py in worker subprocesses, so that a crash (the worker
dies) or a hang (no result within --case-seconds) is seen and counted, then the run goes on from the next case.
Each worker's address space is capped (--max-gib), so a memory blow-up shows as an exception, not a dead machine.

    python benchmarks/fuzz.py --cases 100000 --workers 1 --out fuzz.md      # prints a markdown table of outcomes

Outcome classes: accepted (loads and runs), clean error (GGUFError or a ValueError raised by npulm, one line),
other exception, crash, hang. Cases are numbered: `--start N --cases 1` replays case N.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def _bases(tmp: Path):
    from fuzzing import gpt2_variant, spec_from_file
    from gguf.constants import GGMLQuantizationType as T
    from gguf_writers import write_tiny_model

    specs = [spec_from_file(write_tiny_model(tmp / f"{a}.gguf", a, n_layer=3 if a == "gemma3" else 2))
             for a in ("llama", "qwen2", "gemma3")]
    specs.append(spec_from_file(write_tiny_model(tmp / "q4_0.gguf", "llama", T.Q4_0, tied=False)))
    return [*specs, gpt2_variant(specs[0])]


def worker(start: int, stop: int, max_gib: float) -> None:
    """Print one line per case: index, outcome, stage, family, message."""
    import warnings

    from fuzzing import mutate, run_case

    warnings.simplefilter("ignore")
    limit = int(max_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        bases = _bases(tmp)
        path = tmp / "case.gguf"
        for i in range(start, stop):
            data, family = mutate(bases, i)
            path.write_bytes(data)
            outcome, stage, message = run_case(path, template_seconds=0.25)
            print(f"{i}\t{outcome}\t{stage}\t{family}\t{message.replace(chr(9), ' ')}", flush=True)


def drive(start: int, stop: int, case_seconds: float, max_gib: float, log) -> collections.Counter:
    """Run cases start..stop-1 in one worker at a time, restarting it after a crash or a hang."""
    counts: collections.Counter = collections.Counter()
    i = start
    while i < stop:
        proc = subprocess.Popen([sys.executable, __file__, "--worker", "--start", str(i), "--stop", str(stop),
                                 "--max-gib", str(max_gib)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, bufsize=1)
        deadline = time.monotonic() + case_seconds + 30  # the first case also builds the base files
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                proc.kill()
                proc.wait()
                counts["hang", "?"] += 1
                log.write(f"{i}\thang\t?\t?\tno result in {case_seconds} s\n")
                log.flush()
                i += 1
                break
            line = proc.stdout.readline()
            if not line:
                if proc.wait() != 0 and i < stop:
                    counts["crash", "?"] += 1
                    log.write(f"{i}\tcrash\t?\t?\texit status {proc.returncode}\n")
                    log.flush()
                    i += 1
                break
            index, outcome, stage, family, message = line.rstrip("\n").split("\t", 4)
            counts[outcome, stage] += 1
            if outcome not in ("accepted", "clean error"):
                log.write(line)
                log.flush()
            i = int(index) + 1
            deadline = time.monotonic() + case_seconds
            if i % 2000 == 0:
                print(f"fuzz: {i - start:,} of {stop - start:,} cases from seed {start}", file=sys.stderr, flush=True)
    return counts


def crafted_table() -> str:
    """The bad inputs of issue 14, each run through `npulm` as a user would: what each one prints and returns."""
    import contextlib
    import io
    import math
    import struct

    from fuzzing import ARR, F32, I32, STR, U32, variant

    from npulm.cli import main as npulm

    tmp = Path(tempfile.mkdtemp())
    from gguf_writers import write_tiny_model

    good = write_tiny_model(tmp / "tiny.gguf", "llama")
    gpt2 = tmp / "gpt2.gguf"
    from fuzzing import gpt2_variant, serialize, spec_from_file

    gpt2.write_bytes(serialize(gpt2_variant(spec_from_file(good))))
    nested = tmp / "nested.gguf"
    kv = struct.pack("<Q", 1) + b"a" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 500 + struct.pack("<IQ", 4, 0)
    nested.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + kv + bytes(32))
    many = tmp / "many-keys.gguf"
    many.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 7_000_000) + bytes(64))
    shape = spec_from_file(good)
    t = next(t for t in shape.tensors if t[0] == "blk.1.attn_q.weight")
    t[1], t[3] = [64, 32], t[3][:64 * 32 * 4]
    wrong_shape = tmp / "shape.gguf"
    wrong_shape.write_bytes(serialize(shape))

    def model(name: str, changes: dict, base: Path = good) -> str:
        return str(variant(base, tmp / f"{name}.gguf", changes))

    m = str(good)
    cases = [
        ("metadata arrays nested 500 deep", ["run", "-m", str(nested)]),
        ("7M metadata keys claimed", ["info", str(many)]),
        ("merge naming a token not in the vocabulary",
         ["run", "-m", model("merge", {"tokenizer.ggml.merges": (ARR, (STR, ["Ġ zz"]))}, gpt2)]),
        ("`token_type` retyped as strings",
         ["run", "-m", model("ttype", {"tokenizer.ggml.token_type": (ARR, (STR, ["a"] * 297))})]),
        ("`head_count` = +inf", ["run", "-m", model("inf", {"llama.attention.head_count": (F32, math.inf)})]),
        ("`head_count_kv` = 1.5", ["run", "-m", model("kv15", {"llama.attention.head_count_kv": (F32, 1.5)})]),
        ("`head_count_kv` = 3 (does not divide 4 heads)",
         ["run", "-m", model("kv3", {"llama.attention.head_count_kv": (U32, 3)})]),
        ("`embedding_length` as an array", ["run", "-m", model("arr", {"llama.embedding_length": (ARR, (I32, [64]))})]),
        ("`attn_q` of a wrong shape (data to match)", ["run", "-m", str(wrong_shape)]),
        ("chat template `{{ 1/0 }}`", ["chat", "-m", model("t1", {"tokenizer.chat_template": (STR, "{{ 1/0 }}")})]),
        ("chat template nested `range(100000)` loops", ["chat", "-m", model("t2", {"tokenizer.chat_template": (
            STR, "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")})]),
        ("chat template `'a' * 10**10`", ["chat", "-m", model("t3", {"tokenizer.chat_template": (
            STR, "{{ 'a' * 10**10 }}")})]),
        ("chat template, recursive macro", ["chat", "-m", model("t4", {"tokenizer.chat_template": (
            STR, "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}")})]),
        ("`-p` with invalid UTF-8", ["run", "-m", m, "-p", os.fsdecode(b"caf\xff")]),
        ("`--repeat-penalty 0`", ["run", "-m", m, "--repeat-penalty", "0"]),
        ("`--temp nan`", ["run", "-m", m, "--temp", "nan"]),
        ("`--top-p 1.5`", ["run", "-m", m, "--top-p", "1.5"]),
        ("`--top-k -5`", ["run", "-m", m, "--top-k", "-5"]),
        ("`-m` a directory", ["run", "-m", str(tmp)]),
        ("`-m /dev/null`", ["run", "-m", "/dev/null"]),
        ("`-c 1`", ["run", "-m", m, "-c", "1", "-p", "the cat"]),
        ("`-ngl abc`", ["run", "-m", m, "-ngl", "abc"]),
        ("`--pipeline` without `-ngl`", ["run", "-m", m, "--pipeline", "W16A16"]),
    ]
    rows = ["| bad input | exit | what npulm prints (last line of stderr) |", "|---|---|---|"]
    for what, argv in cases:
        err = io.StringIO()
        stdin, sys.stdin = sys.stdin, io.StringIO("hello\n")
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = npulm([*argv, "-n", "2"] if argv[0] != "info" else argv)
        finally:
            sys.stdin = stdin
        lines = [x for x in err.getvalue().replace("\r", "\n").splitlines() if x.strip()]
        last = lines[-1].replace(str(tmp) + "/", "").replace(str(tmp), "DIR").replace("|", "\\|") if lines else ""
        assert "Traceback" not in err.getvalue(), what
        rows.append(f"| {what} | {code} | `{last}` |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=100_000)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int, default=None)
    ap.add_argument("--workers", type=int, default=1, help="parallel drivers, each over its share of the cases")
    ap.add_argument("--case-seconds", type=float, default=30.0, help="a case with no result by then is a hang")
    ap.add_argument("--max-gib", type=float, default=6.0, help="address-space cap of a worker")
    ap.add_argument("--log", default="fuzz-failures.tsv", help="where cases other than accepted / clean go")
    ap.add_argument("--crafted", action="store_true", help="print the table of issue 14's bad inputs and exit")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.crafted:
        print(crafted_table())
        return
    if args.worker:
        worker(args.start, args.stop, args.max_gib)
        return
    import concurrent.futures as cf

    stop = args.start + args.cases
    bounds = [args.start + args.cases * k // args.workers for k in range(args.workers + 1)]
    t0 = time.monotonic()
    with open(args.log, "w") as log, cf.ThreadPoolExecutor(args.workers) as pool:
        parts = list(pool.map(lambda k: drive(bounds[k], bounds[k + 1], args.case_seconds, args.max_gib, log),
                              range(args.workers)))
    counts = sum(parts, collections.Counter())
    total = sum(counts.values())
    by_class = collections.Counter()
    for (outcome, _), n in counts.items():
        by_class[outcome] += n
    print(f"{total:,} cases (seeds {args.start}..{stop - 1}) in {time.monotonic() - t0:.0f} s, {args.workers} "
          f"worker(s), {os.cpu_count()} cores\n")
    print("| outcome | cases | share |\n|---|---|---|")
    for outcome in ("accepted", "clean error", "other exception", "crash", "hang"):
        print(f"| {outcome} | {by_class[outcome]:,} | {by_class[outcome] / max(total, 1):.1%} |")
    print("\n| outcome | stage reached | cases |\n|---|---|---|")
    for (outcome, stage), n in sorted(counts.items()):
        print(f"| {outcome} | {stage} | {n:,} |")


if __name__ == "__main__":
    main()
