"""Board calibration of the cost model (`npulm doctor --calibrate`): time the NPU on this board and write a profile
that `npulm.npu.cost.constants(profile=...)` (or $NPULM_COST_PROFILE) uses in place of the published constants.

Measured with the planner's own contexts (native layouts, one context per core, `Arena.run_cores`), so what is
timed is what npulm runs:
  launch_s            the smallest legal INT8 matmul, one core
  bw_core / bw_total  INT8 M=1 over a B of 8+ MB (bandwidth-bound): one core, then every core in parallel
  npu_row_s           the cost per A row beyond the MACs: INT8 K=N=1024 timed at M=128 and 512, one core
  ops_<type>_native   M=512 x K x N per matmul type (fp16 at K=2048, 4096, 8192: the fp16 collapse), one core
  overlap             time of all cores in parallel / time of one core (1.0: the cores overlap fully)
  host_a76_factor     npulm's host work for W16A16 per call timed here / the same work in npulm.npu.host_cost
  host_threads        how much faster the threaded C host work runs at M=128 than one thread would
The emulator has no timing: calibrating there is refused with a clear message.
"""

from __future__ import annotations

import json
import statistics
import time

import numpy as np

from .planner import Arena, NpuMatmul
from .rknn import FLOAT16_MM_FLOAT16_TO_FLOAT32, INT4_MM_INT4_TO_INT16, INT8_MM_INT8_TO_INT32


class CalibrationError(RuntimeError):
    pass


def _median_time(fn, reps: int) -> float:
    fn()  # warm: contexts, caches
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _matmul(arena: Arena, k: int, n: int, mm_type: int) -> NpuMatmul:
    rng = np.random.default_rng(0)
    if mm_type == FLOAT16_MM_FLOAT16_TO_FLOAT32:
        b = rng.standard_normal((n, k)).astype(np.float16)
    else:
        lim = 7 if mm_type == INT4_MM_INT4_TO_INT16 else 127
        b = rng.integers(-lim, lim + 1, (n, k)).astype(np.int8)
    k_al, _ = arena.chip.padded_align(mm_type)
    return NpuMatmul(arena, b, mm_type, max(k_al, min(k, arena.chip.max_k) // k_al * k_al), name="calibrate")


def calibrate(rt, reps: int = 20, quick: bool = False) -> dict:
    """Time this board's NPU through `rt` (a librknnrt runtime). Returns {"chip", "constants", "measured"}.
    quick: small shapes (a smoke run: the figures are then dominated by fixed costs)."""
    if rt.kind == "emulator":
        raise CalibrationError("the emulator has no timing: run `npulm doctor --calibrate` on a board with librknnrt")
    chip = rt.chip
    arena = Arena(rt, parallel=True)
    n_cores = arena.n_core_slices
    consts: dict[str, float] = {}
    measured: dict[str, float] = {}
    ops = []
    try:
        # launch: the smallest legal matmul on one core
        k_al, n_al = chip.padded_align(INT8_MM_INT8_TO_INT32)
        op = _matmul(arena, k_al, n_al, INT8_MM_INT8_TO_INT32)
        ops.append(op)
        one = [op.bucket(1).ctxs[0][:1]]
        consts["launch_s"] = _median_time(lambda: arena.run_cores(one), reps)
        # bandwidth: INT8 M=1, B of K x N bytes; one core, then all cores
        k, n = (256, 64 * n_cores) if quick else (4096, 4096 * n_cores)
        op = _matmul(arena, k, n, INT8_MM_INT8_TO_INT32)
        ops.append(op)
        bk = op.bucket(1)
        core_bytes = op.b_bytes / len(op.slices)
        t_one = _median_time(lambda: arena.run_cores([bk.ctxs[0]]), reps)
        t_all = _median_time(lambda: arena.run_cores(bk.ctxs), reps)
        consts["bw_core"] = core_bytes / max(t_one - consts["launch_s"], 1e-9)
        consts["bw_total"] = op.b_bytes / max(t_all - consts["launch_s"], 1e-9)
        measured["overlap"] = t_all / t_one
        # the cost per A row of a call: INT8 K=N=1024 at M=128 and 512 on one core; what grows with M beyond the MACs
        # at the throughput measured next is npu_row_s (wtwver's M=128 rows put it at 0.68 us)
        m, wide = (4, 64) if quick else (512, 1024)
        op = _matmul(arena, 256 if quick else 1024, wide * n_cores, INT8_MM_INT8_TO_INT32)
        ops.append(op)
        n_core = op.slices[0][1] - op.slices[0][0]
        t_m = {}
        for mm in (m // 4, m):
            bk = op.bucket(mm)
            t_m[mm] = (bk.rows, _median_time(lambda b=bk: arena.run_cores([b.ctxs[0]]), max(3, reps // 4)))
        (r1, t1), (r2, t2) = t_m[m // 4], t_m[m]
        # t = launch + rows x (row_s + 2 K N_core / ops): the slope per row, split with the ops measured at K=2048
        slope = max(t2 - t1, 1e-12) / max(r2 - r1, 1)
        # throughput per type at M=512, one core
        for name, mm_type, kk in (("ops_int8_native", INT8_MM_INT8_TO_INT32, 2048),
                                  ("ops_fp16_native", FLOAT16_MM_FLOAT16_TO_FLOAT32, 2048),
                                  ("ops_fp16_native_k4096", FLOAT16_MM_FLOAT16_TO_FLOAT32, 4096),
                                  ("ops_fp16_native_k8192", FLOAT16_MM_FLOAT16_TO_FLOAT32, 8192),
                                  ("ops_int4_native", INT4_MM_INT4_TO_INT16, 2048)):
            if not chip.supports(mm_type) or (quick and kk > 2048):
                continue
            op = _matmul(arena, 256 if quick else kk, wide * n_cores, mm_type)
            ops.append(op)
            bk = op.bucket(m)
            t = _median_time(lambda b=bk: arena.run_cores([b.ctxs[0]]), max(3, reps // 4))
            n_c = op.slices[0][1] - op.slices[0][0]
            row_s = consts.get("npu_row_s", 0.0)
            consts[name] = 2.0 * bk.rows * op.chunk_k * op.n_chunks * n_c / max(
                t - consts["launch_s"] - bk.rows * row_s, 1e-9)
            if name == "ops_int8_native":  # the row cost: the K=1024 slope less its MACs at this rate, then re-solve
                consts["npu_row_s"] = max(slope - 2.0 * (256 if quick else 1024) * n_core / consts[name], 0.0)
                consts[name] = 2.0 * bk.rows * op.chunk_k * op.n_chunks * n_c / max(
                    t - consts["launch_s"] - bk.rows * consts["npu_row_s"], 1e-9)
        consts["host_a76_factor"], consts["host_threads"] = _host_factor(arena, reps, 256 if quick else 2048)
    finally:
        for op in ops:
            op.close()
        arena.close()
    return {"chip": chip.name, "runtime": rt.describe(), "date": time.strftime("%Y-%m-%d"), "constants": consts,
            "measured": measured}


def _host_factor(arena: Arena, reps: int, size: int = 2048) -> tuple[float, float]:
    """npulm's W16A16 host work here against the development VM's single-thread figures (host_cost.py): at M=1
    (one thread) the CPU factor, at M=128 (rows split over the cores) the effective thread count."""
    from gguf.constants import GGMLQuantizationType as Q

    from ..linear import Weight
    from . import cost
    from .host_cost import HOST_COST
    from .prepared import prepare

    w = (np.random.default_rng(1).standard_normal((size, size)) * 0.05).astype(np.float16)
    pr = prepare("W16A16", Weight("calibrate.w", Q.F16, size, size, w), arena)
    try:
        op = pr.ops[0]
        ratios = []
        per_call, per_elem = HOST_COST["W16A16"]
        for m in (1, 128):
            x = np.random.default_rng(m).standard_normal((m, size)).astype(np.float32)
            bk = op.bucket(m)
            t_call = _median_time(lambda xx=x: pr(xx), reps)
            t_npu = _median_time(lambda b=bk: arena.run_cores(b.ctxs), reps)
            g = cost.npulm_geometry("W16A16", size, size, "F16", arena.chip)
            vm = per_call + per_elem * m * (g.k_pad + g.n_chunks * g.n_pad)
            ratios.append(max(t_call - t_npu, 1e-9) / vm)
        factor = ratios[0]
        return float(factor), float(max(factor / ratios[1], 1.0))
    finally:
        pr.close()


def write_profile(profile: dict, path: str) -> None:
    """Write the profile; what `npulm doctor --profile` put there besides the constants (the nibble order) stays."""
    import os

    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        profile = {**{k: v for k, v in old.items() if k not in profile}, **profile}
    with open(path, "w") as f:
        json.dump(profile, f, indent=1)
        f.write("\n")


def run_cli(rt, path: str) -> int:
    """`npulm doctor --calibrate PROFILE`: calibrate, print the constants next to the published ones, write."""
    import sys

    from .cost import constants

    try:
        prof = calibrate(rt)
    except CalibrationError as e:
        print(f"npulm doctor: cannot calibrate: {e}", file=sys.stderr)
        return 1
    published = constants(rt.chip.name)
    print(f"calibration of {prof['runtime']}:")
    for k, v in prof["constants"].items():
        print(f"  {k:24s} {v:12.4g}   (published {published.get(k, float('nan')):.4g})")
    for k, v in prof["measured"].items():
        print(f"  {k:24s} {v:12.4g}")
    write_profile(prof, path)
    print(f"wrote {path}: use it with `npulm plan --profile {path}` or NPULM_COST_PROFILE={path}")
    return 0
