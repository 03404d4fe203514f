"""npulm vs llama.cpp on the same GGUF files, in one run: prompt (pp) and generation (tg) tok/s, load time, RSS.

    python benchmarks/speed.py [-p 512] [-n 128] [-d 0] [-t 2] [-r 3] [--models smollm2-135m gemma3-270m]
                               [--llama-cpp auto|bench|python|none] [--a8]

--a8 adds a row for npulm with int8 activations in every matmul (`-ot '*=cpu:a8'`), llama.cpp's precision; the
default "cpu" gives the roles that matter most 16-bit activations (see npulm/cpu/__init__.py).

Each engine runs in its own subprocess, so load time and peak RSS are per engine (peak RSS from wait4 on the child).
npulm: `python -m npulm.cli bench -o json`. llama.cpp: the `llama-bench` binary ($LLAMA_BENCH, else on PATH) with
`-o json`; its load time is the wall time of a `-p 0 -n 1 -r 1 --no-warmup` run minus its one timed token, and that
run's peak RSS is its "RSS after load". Without llama-bench, llama-cpp-python (if installed) is timed the same way
npulm is (`Llama.eval` of random token ids, in a subprocess). The goal for npulm is a peak RSS, once loaded and
running, of at most 1.3x the GGUF file size. The machine's load average is printed: on a busy machine every
figure is noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from npulm import assets  # noqa: E402
from npulm.bench import int_list, test_name  # noqa: E402

MODELS = {"smollm2-135m": "SmolLM2-135M Q4_1", "gemma3-270m": "Gemma-3-270M Q4_K_M"}
RSS_GOAL = 1.3  # npulm's target: peak RSS once loaded and running <= 1.3x the GGUF file size


@dataclass
class Run:
    """What one engine measured on one model."""

    engine: str
    rates: dict[str, tuple[float, float]] = field(default_factory=dict)  # "pp512" -> (mean t/s, stddev)
    load_s: float | None = None
    load_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    error: str | None = None


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    maxrss_mb: float


def run_measured(cmd: list[str], env: dict[str, str] | None = None) -> Proc:
    """Run a command; its exit code, output, wall time and its own peak RSS (wait4, not the children's total)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        out.seek(0)
        err.seek(0)
        return Proc(proc.returncode, out.read().decode(errors="replace"), err.read().decode(errors="replace"),
                    wall, usage.ru_maxrss / 1024)


def row_test(row: dict) -> str:
    return test_name(row["n_prompt"], row["n_gen"], row.get("n_depth", 0))


def failure(p: Proc, what: str) -> str:
    tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
    return f"{what} exited with {p.returncode}: {tail}"


def thread_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # numpy's BLAS pool, if used, as wide as -t
        env.setdefault(var, str(threads))
    return env


def run_npulm(path: Path, args: argparse.Namespace, spec: str = "") -> Run:
    env = thread_env(args.threads)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "npulm.cli", "bench", "-m", str(path), "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-d", args.n_depth, "-t", str(args.threads), "-r", str(args.repetitions),
           "-o", "json"] + (["-ot", f"*={spec}"] if spec else [])
    p = run_measured(cmd, env)
    run = Run(f"npulm ({spec})" if spec else "npulm")
    if p.returncode != 0:
        run.error = failure(p, "npulm bench")
        return run
    rows = json.loads(p.stdout)
    run.rates = {row_test(r): (r["avg_ts"], r["stddev_ts"]) for r in rows}
    run.load_s, run.load_rss_mb, run.peak_rss_mb = rows[0]["load_s"], rows[0]["load_rss_mb"], p.maxrss_mb
    return run


def run_llama_bench(binary: str, path: Path, args: argparse.Namespace) -> Run:
    env = thread_env(args.threads)
    run = Run("llama.cpp (llama-bench)")
    cmd = [binary, "-m", str(path), "-p", str(args.n_prompt), "-n", str(args.n_gen), "-t", str(args.threads),
           "-r", str(args.repetitions), "-o", "json"] + (["-d", args.n_depth] if args.n_depth != "0" else [])
    p = run_measured(cmd, env)
    if p.returncode != 0:
        run.error = failure(p, "llama-bench")
        return run
    rows = json.loads(p.stdout)
    run.rates = {row_test(r): (r["avg_ts"], r["stddev_ts"]) for r in rows}
    run.peak_rss_mb = p.maxrss_mb
    if rows:
        run.engine = f"llama.cpp {rows[0].get('build_commit', '')} (llama-bench)".replace("  ", " ")
    # llama-bench does not report its load time: time a run that loads the model and decodes a single token
    probe = run_measured([binary, "-m", str(path), "-p", "0", "-n", "1", "-t", str(args.threads), "-r", "1",
                          "--no-warmup", "-o", "json"], env)
    if probe.returncode == 0:
        token_s = json.loads(probe.stdout)[0]["samples_ns"][0] * 1e-9
        run.load_s, run.load_rss_mb = probe.wall_s - token_s, probe.maxrss_mb
    return run


def run_llama_cpp_python(path: Path, args: argparse.Namespace) -> Run:
    cmd = [sys.executable, __file__, "--llama-cpp-python-worker", str(path), "-p", str(args.n_prompt),
           "-n", str(args.n_gen), "-d", args.n_depth, "-t", str(args.threads), "-r", str(args.repetitions)]
    p = run_measured(cmd, thread_env(args.threads))
    run = Run("llama.cpp (llama-cpp-python)")
    if p.returncode != 0:
        run.error = failure(p, "llama-cpp-python worker")
        return run
    out = json.loads(p.stdout)
    run.engine = f"llama.cpp (llama-cpp-python {out['version']})"
    run.rates = {k: tuple(v) for k, v in out["rates"].items()}
    run.load_s, run.load_rss_mb, run.peak_rss_mb = out["load_s"], out["load_rss_mb"], p.maxrss_mb
    return run


def llama_cpp_python_worker(args: argparse.Namespace) -> int:
    """In its own process: llama-cpp-python timed as npulm bench times npulm (random ids, eval only)."""
    import random
    import resource

    import llama_cpp

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    t0 = time.perf_counter()
    depths = int_list(args.n_depth)
    llm = llama_cpp.Llama(args.worker_model, n_ctx=max(depths) + args.n_prompt + args.n_gen + 8, n_batch=512,
                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    load_s, load_rss = time.perf_counter() - t0, rss_mb()
    rng = random.Random(0)
    bos = llm.token_bos() if llm.metadata.get("tokenizer.ggml.add_bos_token", "true") == "true" else None

    def ids(n: int) -> list[int]:
        t = [rng.randrange(llm.n_vocab()) for _ in range(n)]
        if bos is not None and bos >= 0:
            t[0] = bos
        return t

    def once(n: int, one_by_one: bool, depth: int) -> float:
        tokens = ids(n)
        llm.reset()
        if depth:
            llm.eval(ids(depth))  # context, untimed (llama-bench's -d)
        t = time.perf_counter()
        if one_by_one:
            for tok in tokens:
                llm.eval([tok])
        else:
            llm.eval(tokens)
        return time.perf_counter() - t

    rates = {}
    for p_n, g_n in ((args.n_prompt, 0), (0, args.n_gen)):
        for d in depths:
            n, one_by_one = (p_n, False) if p_n else (g_n, True)
            if n <= 0:
                continue
            once(n, one_by_one, d)  # warm-up
            ts = [n / once(n, one_by_one, d) for _ in range(args.repetitions)]
            rates[test_name(p_n, g_n, d)] = (statistics.fmean(ts), statistics.stdev(ts) if len(ts) > 1 else 0.0)
    json.dump({"version": llama_cpp.__version__, "rates": rates, "load_s": load_s, "load_rss_mb": load_rss},
              sys.stdout)
    return 0


def llama_cpp_engine(choice: str) -> tuple[str, str | None]:
    """("bench", binary) | ("python", None) | ("none", None), and why."""
    binary = os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")
    if choice in ("auto", "bench") and binary and os.access(binary, os.X_OK):
        return "bench", binary
    if choice == "bench":
        sys.exit("speed.py: no llama-bench binary (set LLAMA_BENCH or put it on PATH)")
    if choice in ("auto", "python"):
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            if choice == "python":
                sys.exit("speed.py: llama-cpp-python is not installed")
        else:
            return "python", None
    return "none", None


# ------------------------------------------------------------------------------------------------------- output

def fmt_rate(r: tuple[float, float] | None) -> str:
    return f"{r[0]:.1f} ± {r[1]:.1f}" if r else "-"


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return f"{x:{spec}}{suffix}" if x is not None else "-"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def table(results: list[tuple[str, int, list[Run]]], tests: list[str]) -> str:
    head = ["model", "file", "engine", *(f"{t} t/s" for t in tests), "load s", "RSS after load MiB", "peak RSS MiB",
            "RSS after load / file", "peak RSS / file"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, size, runs in results:
        mib = size / 2**20
        first = True
        for run in runs:
            if run.error:
                cells = [run.engine, f"failed: {run.error}"] + [""] * (len(head) - 4)
            else:
                cells = [run.engine, *(fmt_rate(run.rates.get(t)) for t in tests), fmt(run.load_s, ".2f"),
                         fmt(run.load_rss_mb, ".0f"), fmt(run.peak_rss_mb, ".0f"),
                         *(fmt(x / mib if x else None, ".2f", "x") for x in (run.load_rss_mb, run.peak_rss_mb))]
            lines.append("| " + " | ".join([label if first else "", f"{mib:.1f} MiB" if first else "", *cells]) + " |")
            first = False
        b = runs[-1]
        for a in runs[:-1] if b.engine.startswith("llama.cpp") and not b.error else []:
            if a.error:
                continue
            cells = [f"{a.engine} / llama.cpp",
                     *(ratio((a.rates.get(t) or (None,))[0], (b.rates.get(t) or (None,))[0]) for t in tests),
                     ratio(a.load_s, b.load_s), ratio(a.load_rss_mb, b.load_rss_mb),
                     ratio(a.peak_rss_mb, b.peak_rss_mb), "", ""]
            lines.append("| | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (0 = no pp test)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (0 = no tg test)")
    ap.add_argument("-d", "--n-depth", default="0",
                    help="context tokens before each test, untimed (comma list, as llama-bench's -d); default 0")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-r", "--repetitions", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=list(MODELS), help="known names or GGUF paths")
    ap.add_argument("--llama-cpp", choices=["auto", "bench", "python", "none"], default="auto",
                    help="llama.cpp engine: llama-bench, llama-cpp-python, or none (npulm alone)")
    ap.add_argument("--a8", action="store_true", help="also run npulm with int8 activations everywhere (cpu:a8)")
    ap.add_argument("--llama-cpp-python-worker", dest="worker_model", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker_model:
        return llama_cpp_python_worker(args)
    if args.n_prompt <= 0 and args.n_gen <= 0:
        sys.exit("speed.py: nothing to run (-p 0 -n 0)")
    kind, binary = llama_cpp_engine(args.llama_cpp)
    tests = [test_name(p, n, d) for p, n in ((args.n_prompt, 0), (0, args.n_gen)) if p + n > 0
             for d in int_list(args.n_depth)]
    load_start = os.getloadavg()
    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    results = []
    for name in args.models:
        path = assets.resolve_model(name)
        print(f"speed.py: {name}: npulm ...", file=sys.stderr, flush=True)
        runs = [run_npulm(path, args)]
        if args.a8:
            print(f"speed.py: {name}: npulm cpu:a8 ...", file=sys.stderr, flush=True)
            runs.append(run_npulm(path, args, "cpu:a8"))
        if kind != "none":
            print(f"speed.py: {name}: llama.cpp ({kind}) ...", file=sys.stderr, flush=True)
            runs.append(run_llama_bench(binary, path, args) if kind == "bench" else run_llama_cpp_python(path, args))
        results.append((MODELS.get(name, Path(name).name), path.stat().st_size, runs))
    load_end = os.getloadavg()

    engine = {"bench": "llama.cpp: llama-bench", "python": "llama.cpp: llama-cpp-python (Llama.eval, timed as npulm)",
              "none": "llama.cpp: not found (no llama-bench, no llama-cpp-python): npulm alone"}[kind]
    print(f"# npulm {git_commit()} vs llama.cpp, {started}: -p {args.n_prompt} -n {args.n_gen} -d {args.n_depth} "
          f"-t {args.threads} "
          f"-r {args.repetitions}, {os.cpu_count()} CPUs")
    print(f"# {engine}")
    print("# load average (1/5/15 min): start " + " / ".join(f"{x:.2f}" for x in load_start)
          + ", end " + " / ".join(f"{x:.2f}" for x in load_end)
          + (" (busy machine: rates are noisy)" if max(load_start[0], load_end[0]) > 0.5 * (os.cpu_count() or 1)
             else ""))
    print()
    print(table(results, tests))
    print()
    how = {"bench": "llama-bench's load is a 1-token run's wall time minus that token, its RSS after load that "
                    "run's peak",
           "python": "llama-cpp-python's the same as npulm's", "none": ""}[kind]
    print(f"t/s: mean ± stddev of {args.repetitions} runs after a warm-up. Load time and RSS after load: npulm's "
          f"Llama() in-process (peak RSS once loaded){'; ' + how if how else ''}. Peak RSS: the whole run's, per "
          f"process (the Python interpreter included); npulm maps the GGUF and pages weights in on first use, so its "
          f"weights show in the peak, not after load. Goal for npulm: peak RSS <= {RSS_GOAL}x the file.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
