"""Host-side cost of one NPU matmul call: everything npulm does around rknn_matmul_run, without the matmul itself.

    python benchmarks/npu_overhead.py                 # K = N = 2048 and the two models' shapes, M = 1 and 128
    python benchmarks/npu_overhead.py --pipelines W8A8_CHANNEL,W16A16 --m 1
    python benchmarks/npu_overhead.py --pipelines W16A16,W8A8_CHANNEL --m 128,512 --clock wall --threads 2
    python benchmarks/npu_overhead.py --scaling 1,2   # a whole layer's C host work, 1 vs 2 threads (host_threads)
    python benchmarks/npu_overhead.py --fit           # also fit per-call / per-element host cost per pipeline and
                                                      # write npulm/npu/host_cost.py (the cost model's host term)

The runtime is the emulator with `run()` replaced by a no-op: A is written into the shared A buffer, the per-core
contexts are dispatched (on the core thread pool with --parallel), C is read from its (stale, preallocated) buffer
and dequantized, exactly as on a board; only the NPU's own work is missing. Phases:
  quantize   x -> A values: rotation, per-row / per-group scales, rounding (and int4 halves)
  write A    A values -> the native A layout in NPU memory (one strided copy, nibble packing for int4)
  dispatch   handing the per-core context lists to the cores and waiting (no-op runs)
  epilogue   C -> y: per-chunk / per-group scales, shift terms, sums
`total` is one whole call (Prepared.__call__); the phases are timed separately on the same inputs.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from npulm.linear import Weight
from npulm.npu import cost
from npulm.npu import pipelines as P
from npulm.npu import prepared as R
from npulm.npu import quant as qm
from npulm.npu.emulator import EmulatorRuntime
from npulm.npu.planner import Arena

SHAPES = {  # (K, N): the square reference and the linears of SmolLM2-135M and Gemma-3-270M
    "square": [(2048, 2048)],
    "smollm2": [(576, 576), (576, 192), (576, 1536), (1536, 576)],
    "gemma3": [(640, 1024), (640, 256), (1024, 640), (640, 2048), (2048, 640)],
}
DEFAULT = "W16A16,W8A8_CHANNEL,W8A8_HADAMARD,W8A16_CHANNEL,W8A16_HADAMARD,W4A8_BLOCK,W4A4_HADAMARD"


class NoopRuntime(EmulatorRuntime):
    """The emulator without the matmul: run() leaves C as it is."""

    def run(self, ctx: int) -> None:
        pass


CLOCK = time.thread_time  # CPU time of this thread: other jobs on a shared machine do not count (--clock wall)


def timeit(fn, min_time: float = 0.2, min_reps: int = 20) -> float:
    """Median seconds per call over batches filling at least min_time."""
    fn()
    reps, t = 1, 0.0
    while True:
        t0 = CLOCK()
        for _ in range(reps):
            fn()
        t = CLOCK() - t0
        if t >= 0.02:
            break
        reps *= 4
    batches = max(5, int(min_time / t))
    samples = []
    for _ in range(batches):
        t0 = CLOCK()
        for _ in range(reps):
            fn()
        samples.append((CLOCK() - t0) / reps)
    return float(np.median(samples))


def make_weight(k: int, n: int, pipeline: str) -> Weight:
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    qtype = Q.Q4_0 if P.PIPELINES[pipeline].weights != "fp16" else Q.F16
    raw = w.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(w, qtype)
    return Weight(f"bench.{k}x{n}", qtype, n, k, raw)


def phases(pr: R.Prepared, x: np.ndarray) -> dict[str, float]:
    """Seconds per call of the whole call and of its phases (re-implemented here step by step, same inputs)."""
    op = pr.ops[0]
    m = x.shape[0]
    out = {"total": timeit(lambda: pr(x))}
    bk = op.bucket(m)
    out["dispatch"] = timeit(lambda: op.arena.run_cores(bk.ctxs))
    rows = m * op.row_factor
    a = np.zeros((op.n_chunks, rows, op.chunk_k), np.int8 if op.a_dt != "fp16" else np.float16)
    out["write A"] = timeit(lambda: op._write_a(bk, a, rows))
    if isinstance(pr, R.FloatPrepared):
        def quantize():
            if m == 1:
                return x / np.float32(2.0 ** (math.frexp(float(np.abs(x).max()))[1] - 14))
            return x / np.ldexp(np.float32(1), np.frexp(np.abs(x).max(axis=1, keepdims=True))[1] - 14)
    else:
        def quantize():
            x64 = x.astype(np.float64)
            if pr.rotation is not None:
                x64 = qm.rotate_activation(x64, pr.rotation)
            if pr.real.x_residual:
                return qm.quantize_rows_residual(x64)
            q, _ = R.quantize_rows(x64, pr.act_bits)
            return R._split_rows(q.astype(np.int8)) if pr.real.a_split else q
    out["quantize"] = timeit(quantize)
    out["epilogue"] = max(0.0, out["total"] - out["dispatch"] - out["write A"] - out["quantize"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipelines", default=DEFAULT)
    ap.add_argument("--m", default="1,128", help="token rows per call")
    ap.add_argument("--shapes", default="square,smollm2,gemma3")
    ap.add_argument("--parallel", action="store_true", help="dispatch the cores on the thread pool")
    ap.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                    help="cpu: this thread's CPU time (default; robust on a shared machine), wall: elapsed time")
    ap.add_argument("--threads", type=int, default=1, help="threads of the C host work (pipelines.C_HOST) for large "
                                                            "calls; > 1 needs --clock wall")
    ap.add_argument("--scaling", default=None, metavar="T1,T2",
                    help="instead: the C host work of a whole layer (Gemma-3-270M, Qwen2.5-1.5B shapes, M=512) with "
                         "T1 and then T2 threads, wall time, min over interleaved repeats, and the ratio")
    ap.add_argument("--fit", action="store_true", help="fit host = per_call + per_elem x (A + C values) per "
                                                       "pipeline and write npulm/npu/host_cost.py")
    args = ap.parse_args(argv)
    if args.scaling:
        return scaling([int(v) for v in args.scaling.split(",")], args.pipelines)
    samples: dict[str, list[tuple[int, int, float]]] = {}
    global CLOCK
    if R._host is not None:  # one thread: the CPU time of the calling thread is then the whole host work
        R._host.set_threads(args.threads)
    if args.threads > 1 and args.clock != "wall":
        raise SystemExit("--threads > 1 runs the host work on other threads too: time it with --clock wall")
    if args.clock == "wall":
        CLOCK = time.perf_counter
    elif args.parallel:
        raise SystemExit("--parallel dispatches on other threads: time it with --clock wall")
    arena = Arena(NoopRuntime("rk3588"), parallel=args.parallel)
    ms = [int(v) for v in args.m.split(",")]
    print(f"host time per call, microseconds of {'CPU' if args.clock == 'cpu' else 'wall'} time (emulator with "
          f"no-op run, rk3588 layout, {'thread pool' if args.parallel else 'caller thread'} dispatch; "
          f"C host path: {'yes' if R._host is not None else 'no'}, {args.threads} host thread(s))\n")
    print("| pipeline | K x N | M | total | quantize | write A | dispatch | epilogue | NPU calls |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.pipelines.split(","):
        for group in args.shapes.split(","):
            for k, n in SHAPES[group]:
                w = make_weight(k, n, name)
                pr = R.prepare(name, w, arena)
                for m in ms:
                    x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                    ph = phases(pr, x)
                    calls = sum(len(c) for c in pr.ops[0].bucket(m).ctxs)
                    g = cost.npulm_geometry(name, k, n, w.type.name, arena.chip)
                    elems = m * g.rows_per_token * (g.k_pad + g.n_chunks * g.n_pad)
                    samples.setdefault(name, []).append((m, elems, ph["total"]))
                    print(f"| {name} | {k} x {n} | {m} | {ph['total'] * 1e6:.1f} | {ph['quantize'] * 1e6:.1f} | "
                          f"{ph['write A'] * 1e6:.1f} | {ph['dispatch'] * 1e6:.1f} | {ph['epilogue'] * 1e6:.1f} | "
                          f"{calls} |", flush=True)
                pr.close()
    arena.close()
    if args.fit:
        write_fit(samples)
    return 0


LAYERS = {  # one block's linears (K, N) at the plans' prefill M
    "gemma3-270m": [(640, 1024), (640, 256), (640, 256), (1024, 640), (640, 2048), (640, 2048), (2048, 640)],
    "qwen2.5-1.5b": [(1536, 1536), (1536, 256), (1536, 256), (1536, 1536), (1536, 8960), (1536, 8960), (8960, 1536)],
}


def scaling(threads: list[int], pipelines: str, m: int = 512, reps: int = 25) -> int:
    """How the C host work scales with threads: per layer, wall time of every linear's host work (no-op NPU run) with
    each thread count, interleaved so that other load hits both alike; min over repeats."""
    if R._host is None:
        raise SystemExit("the C host extension is not built")
    arena = Arena(NoopRuntime("rk3588"))
    names = [p for p in pipelines.split(",") if p in P.C_HOST]
    print(f"C host work per layer, M={m}, ms of wall time (min of {reps}, threads interleaved)\n")
    print("| pipeline | layer | " + " | ".join(f"{t} thread(s)" for t in threads) + f" | x ({threads[-1]} / "
          f"{threads[0]}) |")
    print("|---|---|" + "---|" * (len(threads) + 1))
    for name in names:
        for layer, shapes in LAYERS.items():
            tot = dict.fromkeys(threads, 0.0)
            for k, n in shapes:
                pr = R.prepare(name, make_weight(k, n, name), arena)
                x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
                best = dict.fromkeys(threads, math.inf)
                for _ in range(reps):
                    for t in threads:
                        R._host.set_threads(t)
                        t0 = time.perf_counter()
                        pr(x)
                        best[t] = min(best[t], time.perf_counter() - t0)
                pr.close()
                for t in threads:
                    tot[t] += best[t]
            print(f"| {name} | {layer} | " + " | ".join(f"{tot[t] * 1e3:.2f}" for t in threads) +
                  f" | {tot[threads[0]] / tot[threads[-1]]:.2f} |", flush=True)
    arena.close()
    return 0


def write_fit(samples: dict[str, list[tuple[int, float, float]]]) -> None:
    """t = per_call + per_elem x elems per pipeline, written as a Python table: per_call = the median M=1 call
    (decode: fixed costs dominate), per_elem = the median of the larger calls' (t - per_call) / elems (prefill)."""
    from npulm.npu.host_cost import HOST_COST

    fits = {n: v for n, v in HOST_COST.items() if n in P.PIPELINES}  # the others measured keep their entries
    for name, pts in samples.items():
        a = float(np.median([t for m, _, t in pts if m == 1]))
        b = float(np.median([max(0.0, t - a) / e for m, e, t in pts if m > 1]))
        fits[name] = (a, b)
    path = Path(__file__).resolve().parent.parent / "npulm" / "npu" / "host_cost.py"
    body = "\n".join(f"    {n!r}: ({a:.3e}, {b:.3e})," for n, (a, b) in sorted(fits.items()))
    path.write_text(f'''"""Host (CPU) time around one NPU invocation of each pipeline, measured on the development VM
(x86_64) by `python benchmarks/npu_overhead.py --fit` ({time.strftime("%Y-%m-%d")}, CPU time of the calling
thread, emulator with a no-op run, caller-thread dispatch, one BLAS thread): seconds = per_call + per_elem x
(A values + C values). The cost model scales these to the board's CPU by its host_a76_factor. Regenerate after
changing a pipeline's host work.
"""

HOST_COST: dict[str, tuple[float, float]] = {{  # pipeline: (per_call s, per_elem s)
{body}
}}
''')
    print(f"\nwrote {path}")


if __name__ == "__main__":
    sys.exit(main())
