"""CPU matmul kernels (npulm.cpu, GGUF blocks in place) vs DenseLinear (float32 copy + numpy/OpenBLAS).

For each model's real weight shapes: time per call, GFLOP/s (2*M*N*K / t) and GB/s (bytes of the weight as stored
/ t) at M = 1 (decode) and M = 128 / 512 (prefill). M = 1 is timed by sweeping every tensor of a kind once per
round (all 30 attn_q, ...), so weights come from memory as in a real token, not from a warm cache. Then the sum
over all of a model's matmuls per decoded token (sweep in model order) and per 128-token prefill, against
llama.cpp's per-token times on the same GGUF (llama-bench -t 2: SmolLM2 tg64 147 tok/s, pp128 420 tok/s; Gemma
tg64 90.6, pp128 748).

    python benchmarks/kernels.py [--threads 2] [--models smollm2-135m gemma3-270m] [--no-dense] [--overhead]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

LLAMA_CPP = {  # llama-bench -t 2 on the development machine: (tg64 tok/s, pp128 tok/s)
    "smollm2-135m": (147.0, 420.0),
    "gemma3-270m": (90.6, 748.0),
}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="kernel and BLAS threads (llama-bench -t)")
    p.add_argument("--models", nargs="+", default=list(LLAMA_CPP))
    p.add_argument("--m", nargs="+", type=int, default=[1, 128, 512], help="batch sizes for the shape table")
    p.add_argument("--rounds", type=int, default=7, help="timing rounds (min and median reported)")
    p.add_argument("--no-dense", action="store_true", help="skip the float32 DenseLinear comparison")
    p.add_argument("--overhead", action="store_true", help="also measure per-call overhead (C API vs ctypes)")
    return p.parse_args()


ARGS = parse() if __name__ == "__main__" else None
if ARGS is not None:  # BLAS threads are fixed when numpy loads OpenBLAS
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(ARGS.threads))
    os.environ.setdefault("OMP_NUM_THREADS", str(ARGS.threads))

import numpy as np  # noqa: E402

from npulm import assets, cpu  # noqa: E402
from npulm.cpu import DenseLinear  # noqa: E402
from npulm.gguf import GGUFFile  # noqa: E402
from npulm.linear import Linear, Weight  # noqa: E402
from npulm.placement import make_linear  # noqa: E402


def model_weights(model: str) -> list[Weight]:
    """Every matmul weight of a decoder step, in model order; the output matmul last (token_embd when tied)."""
    g = GGUFFile(assets.model_path(model))
    names = [n for n, t in g.tensors.items() if n.startswith("blk.") and len(t.shape) == 2]
    names.append("output.weight" if "output.weight" in g.tensors else "token_embd.weight")
    return [Weight.from_gguf(g, n) for n in names]


def kind(w: Weight) -> str:
    return w.name.split(".")[2] if w.name.startswith("blk.") else "output"


def stats(ts: list[float]) -> tuple[float, float]:
    return min(ts), float(np.median(ts))


def sweep(lins: list[Linear], xs: list[np.ndarray], rounds: int) -> tuple[list[float], np.ndarray]:
    """Call each Linear once per round, in order; total times per round and the best time per Linear."""
    per = np.full(len(lins), np.inf)
    totals = []
    for _ in range(rounds + 1):  # the first round warms up (page faults, thread start)
        t0 = time.perf_counter()
        for i, (lin, x) in enumerate(zip(lins, xs)):
            a = time.perf_counter()
            lin(x)
            per[i] = min(per[i], time.perf_counter() - a)
        totals.append(time.perf_counter() - t0)
    return totals[1:], per


def timed(f, rounds: int) -> float:
    """Best of `rounds` calls after a warm-up; fewer rounds when one call takes long."""
    t = time.perf_counter()
    f()
    if time.perf_counter() - t > 0.2:
        rounds = min(rounds, 2)
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t)
    return best


def bench_model(model: str, args: argparse.Namespace) -> None:
    weights = model_weights(model)
    tg, pp = LLAMA_CPP.get(model, (None, None))
    print(f"\n## {model}  ({len(weights)} matmuls per token, {sum(w.data.nbytes for w in weights) / 1e6:.1f} MB of "
          f"weights; kernels: {cpu.isa()}, {cpu.get_num_threads()} threads)\n")
    quant = [make_linear(w, "cpu") for w in weights]
    dense = None if args.no_dense else [DenseLinear(w) for w in weights]
    rng = np.random.default_rng(0)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, w in enumerate(weights):
        groups[(kind(w), w.type.name, w.n_out, w.n_in)].append(i)

    head = "| tensor | type | N x K | count | M | npulm us | GFLOP/s | GB/s |"
    sep = "|---|---|---|---|---|---|---|---|"
    if dense:
        head += " dense f32 us | GFLOP/s | speedup |"
        sep += "---|---|---|"
    print(head)
    print(sep)
    prefill = {"npulm": 0.0, "dense": 0.0}
    for (k, tname, n, kin), idx in groups.items():
        nbytes = weights[idx[0]].data.nbytes
        for m in args.m:
            xs = [rng.standard_normal((m, kin)).astype(np.float32) for _ in idx]
            if m == 1:  # every tensor of the kind in turn: weights stream from memory
                t_q = sweep([quant[i] for i in idx], xs, args.rounds)[1].mean()
                t_d = sweep([dense[i] for i in idx], xs, args.rounds)[1].mean() if dense else None
            else:  # compute-bound: one tensor, warm
                q, x0 = quant[idx[0]], xs[0]
                t_q = timed(lambda: q(x0), args.rounds)  # noqa: B023  (called right here)
                d = dense[idx[0]] if dense else None
                t_d = timed(lambda: d(x0), args.rounds) if dense else None  # noqa: B023
            if m == 128 and k != "output":  # llama.cpp computes logits for the last prompt token only
                prefill["npulm"] += len(idx) * t_q
                prefill["dense"] += len(idx) * (t_d or 0.0)
            flops = 2 * m * n * kin
            row = (f"| {k} | {tname} | {n} x {kin} | {len(idx)} | {m} | {t_q * 1e6:.1f} | {flops / t_q / 1e9:.1f} | "
                   f"{nbytes / t_q / 1e9:.1f} |")
            if dense:
                row += f" {t_d * 1e6:.1f} | {flops / t_d / 1e9:.1f} | {t_d / t_q:.2f} |"
            print(row)

    # decode: all matmuls of one token, in model order
    xs = [rng.standard_normal((1, w.n_in)).astype(np.float32) for w in weights]
    totals, per = sweep(quant, xs, args.rounds)
    by_type = defaultdict(float)
    for w, t in zip(weights, per):
        by_type[w.type.name + (" (output)" if kind(w) == "output" else "")] += t
    tmin, tmed = stats(totals)
    print(f"\nDecode, all {len(weights)} matmuls of one token (M = 1): npulm min {tmin * 1e3:.2f} ms, median "
          f"{tmed * 1e3:.2f} ms; by type (sum of per-call minima): "
          + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in by_type.items()))
    if dense:
        dtot, _ = sweep(dense, xs, args.rounds)
        print(f"  dense float32: min {min(dtot) * 1e3:.2f} ms, median {np.median(dtot) * 1e3:.2f} ms")
    if tg:
        print(f"  llama.cpp: {1e3 / tg:.2f} ms per generated token in total (tg64 {tg} tok/s); npulm matmuls are "
              f"{tmin * tg * 100:.0f} % of it (min), {tmed * tg * 100:.0f} % (median)")
    if 128 in args.m:
        out_t = per[-1]  # the output matmul once, M = 1
        total = prefill["npulm"] + out_t
        print(f"Prefill of 128 tokens, matmuls only (output for the last token): npulm {total * 1e3:.1f} ms "
              f"({128 / total:.0f} tok/s)" + (f", dense float32 {(prefill['dense'] + out_t) * 1e3:.1f} ms"
                                              if dense else ""))
        if pp:
            print(f"  llama.cpp pp128: {128e3 / pp:.1f} ms in total ({pp} tok/s)")


def bench_overhead() -> None:
    """Per-call cost at M = 1 on a tiny matrix: the CPython binding vs ctypes into the same library."""
    import ctypes

    from gguf import quants
    from gguf.constants import GGMLQuantizationType as T

    from npulm.cpu import quant

    k = quant._kernels
    data = quants.quantize(np.ones((1, 32), np.float32), T.Q8_0)
    lin = cpu.QuantLinear(Weight("w", T.Q8_0, 1, 32, data))
    x, y = np.ones((1, 32), np.float32), np.empty((1, 1), np.float32)

    class Mat(ctypes.Structure):
        _fields_ = [("data", ctypes.c_void_p), ("type", ctypes.c_int), ("n", ctypes.c_int64),
                    ("k", ctypes.c_int64), ("row_bytes", ctypes.c_int64)]

    lib = ctypes.CDLL(k.__file__)  # the extension exports the plain C entry points too
    lib.nl_matmul.argtypes = [ctypes.POINTER(Mat), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    mat = ctypes.byref(Mat(data.ctypes.data, int(T.Q8_0), 1, 32, 34))

    def per_call(f, n: int = 20000) -> float:
        return timed(lambda: [f() for _ in range(n)], 5) / n * 1e6

    print("\n## Per-call overhead at M = 1 (1 x 32 Q8_0 weight)\n")
    print(f"CPython binding _kernels.matmul(h, x, out): {per_call(lambda: k.matmul(lin._h, x, y)):.2f} us")
    print(f"QuantLinear(x) (allocates the output):      {per_call(lambda: lin(x)):.2f} us")
    print(f"ctypes nl_matmul(mat, x.ctypes.data, ...):  "
          f"{per_call(lambda: lib.nl_matmul(mat, x.ctypes.data, 1, y.ctypes.data, 1)):.2f} us")
    print(f"np.empty((1, 576), float32):                {per_call(lambda: np.empty((1, 576), np.float32)):.2f} us")


def main() -> None:
    args = ARGS or parse()
    if not cpu.available():
        sys.exit("npulm.cpu._kernels is not built")
    cpu.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.5:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other processes share the cores, timings "
              "are inflated (compare with the single-thread CPU-time figures of a quiet run)")
    for model in args.models:
        bench_model(model, args)
    if args.overhead:
        bench_overhead()


if __name__ == "__main__":
    main()
