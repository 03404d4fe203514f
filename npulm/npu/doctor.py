"""`npulm doctor`: what this machine's NPU setup can do, checked rather than assumed.

Reports the chip, librknnrt and driver versions and the open-file limit; creates and runs every matmul type on
small matrices against a CPU reference; probes what the documentation leaves open (which types rknn_matmul_create
accepts, INT4 nibble order, INT16 overflow behaviour, core masks, K limit, IOMMU domains, dynamic shapes); and gives
a verdict per pipeline. Without librknnrt it runs the same checks on the emulator and says so: the results then
describe npulm's code and the emulator's assumptions, not hardware.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys

import gguf
import numpy as np
from gguf.constants import GGMLQuantizationType as Q

from ..linear import Weight
from . import chips
from . import layout as L
from . import pipelines as P
from . import quant as qm
from .context import MatmulContext
from .device import open_runtime
from .planner import Arena, NpuMatmul
from .prepared import prepare
from .rknn import (
    CORE_0,
    CORE_1,
    CORE_2,
    FLOAT16_MM_FLOAT16_TO_FLOAT32,
    INT4_MM_INT4_TO_INT16,
    INT8_MM_INT8_TO_INT32,
    MATMUL_TYPES,
    RknnError,
    RknnLoadError,
)
from .runtime import MatmulInfo
from .simulate import simulate

DRIVER_VERSION_FILE = "/sys/kernel/debug/rknpu/version"
DEVICE_TREE_MODEL = "/proc/device-tree/model"
NOFILE_ADVICE = 65536  # one fd per NPU allocation and context view: big models need tens of thousands


def add_parser(sub) -> None:
    p = sub.add_parser("doctor", help="check the NPU runtime, matmul types and pipelines on this machine")
    p.add_argument("--runtime", choices=("auto", "rknn", "emulator"), default="auto",
                   help="librknnrt (rknn), the emulator, or librknnrt when found (auto)")
    p.add_argument("--chip", default=None, help="chip rules to use (default: detected on a board, else rk3588)")
    p.add_argument("--lib", default=None, help="path of librknnrt.so (default: RKNN_LIB, standard paths)")
    p.add_argument("--calibrate", metavar="PROFILE", default=None,
                   help="time this board's NPU and write the cost model's profile (JSON) for `npulm plan --profile` "
                        "and $NPULM_COST_PROFILE (refused on the emulator)")
    p.add_argument("--profile", metavar="PROFILE", default=None,
                   help="write what the probes find that npulm must follow (the INT4 nibble order, when it differs "
                        "from npulm's) into this board profile (JSON; $NPULM_COST_PROFILE reads it)")
    p.set_defaults(func=cmd_doctor)


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


class Report:
    def __init__(self, out=None):
        self.out, self.problems = out or sys.stdout, 0

    def section(self, title: str) -> None:
        print(f"\n== {title}", file=self.out)

    def line(self, label: str, value: str, ok: bool | None = None) -> None:
        mark = {True: "ok  ", False: "FAIL", None: "    "}[ok]
        if ok is False:
            self.problems += 1
        print(f"  {mark} {label:<34} {value}", file=self.out)


def cmd_doctor(args: argparse.Namespace) -> int:
    rep = Report()
    chip = chips.get_chip(args.chip) if args.chip else None
    try:
        rt = open_runtime(args.runtime, chip or chips.chip_from_env_or_board(), lib_path=args.lib)
    except (RknnLoadError, OSError) as e:
        print(f"npulm doctor: cannot open the {args.runtime} runtime: {e}", file=sys.stderr)
        return 1
    emulated = rt.kind == "emulator"
    if getattr(args, "calibrate", None):
        from .calibrate import run_cli

        return run_cli(rt, args.calibrate)
    if emulated:
        print("*** EMULATOR: no librknnrt here. Every result below comes from npulm's numpy emulator of the matmul\n"
              "*** API and checks npulm's code and the emulator's assumptions, NOT an NPU. Run this on the board.",
              file=rep.out)
    rep.section("system")
    board = _read(DEVICE_TREE_MODEL)
    rep.line("machine", f"{platform.machine()}, {platform.system()} {platform.release()}")
    _cpu(rep)
    rep.line("board (device tree)", board or "none (not a device-tree board)")
    detected = chips.detect_chip()
    rep.line("chip detected", detected.name if detected else "none")
    rep.line("chip rules used", f"{rt.chip.name} ({rt.chip.n_cores} core(s), K per call <= {rt.chip.max_k})")
    rep.line("runtime", rt.describe() + (f" at {rt.lib.path}" if not emulated else ""))
    rep.line("librknnrt version", rt.sdk_version)
    drv = _read(DRIVER_VERSION_FILE)
    rep.line("rknpu driver", drv or rt.driver_version or "unknown (needs root for debugfs)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    enough = soft == resource.RLIM_INFINITY or soft >= NOFILE_ADVICE
    rep.line("open-file limit (soft / hard)", f"{_lim(soft)} / {_lim(hard)}"
             + ("" if enough else f": raise to >= {NOFILE_ADVICE} (ulimit -n) for big models"),
             None if emulated else enough)
    accepted = _matmul_types(rt, rep)
    _probes(rt, rep, accepted, getattr(args, "profile", None))
    _pipelines(rt, rep)
    rep.section("verdict")
    where = "the emulator (not hardware)" if emulated else f"{rt.chip.name} hardware"
    print(f"  {rep.problems} problem(s) on {where}.", file=rep.out)
    return 0 if rep.problems == 0 else 2


# Instruction-set extensions the CPU kernels can use, as /proc/cpuinfo names them (x86 "flags", ARM "Features").
CPU_ISA = ("sse4_2", "avx", "f16c", "fma", "avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
           "asimd", "fphp", "asimdhp", "asimddp", "i8mm", "sve", "sve2")


def _cpu(rep: Report) -> None:
    """The CPU's model and instruction sets, and whether the C kernels were built (and for which)."""
    from ..cpu import available, isa

    model, flags = platform.processor() or "unknown", set()
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model") and model in ("unknown", ""):
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    rep.line("CPU", f"{model}, {os.cpu_count()} logical cores")
    rep.line("CPU instruction sets", " ".join(f for f in CPU_ISA if f in flags) or "none of the known ones")
    rep.line("C kernels", f"built, using {isa()}" if available() else
             "NOT built: CPU matmuls take the slow numpy path (reinstall with a C compiler)", available())
    if available():
        _packed_kernel(rep)


def _packed_kernel(rep: Report, n: int = 4096, k: int = 4096, reps: int = 5) -> None:
    """The packed CPU kernel against the rows kernel on a Q4_0 weight larger than a board's L3 (as decode streams
    one): which types a build repacks by default was chosen without a board (NEON: only those that keep their
    size); this times it here."""
    import time

    from ..cpu import QuantLinear
    from ..cpu.quant import _kernels

    if not _kernels.pack_available(int(Q.Q4_0)):
        rep.line("packed CPU kernel", f"not in this build ({_kernels.isa()}): the rows kernel serves decode")
        return
    blocks = np.random.default_rng(0).integers(0, 256, (n, k // 32, 18), dtype=np.uint8)
    blocks[:, :, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # every block's scale
    w = Weight("doctor.q4_0", Q.Q4_0, n, k, blocks.reshape(n, -1))
    ratios = []
    for m in (1, 8):
        x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
        best = {}
        for pack in (False, True):
            lin = QuantLinear(w, pack=pack)
            lin(x)
            t0 = time.perf_counter()
            for _ in range(reps):
                lin(x)
            best[pack] = (time.perf_counter() - t0) / reps
        ratios.append(f"M = {m}: {best[False] / best[True]:.2f}x")
    rep.line("packed/rows kernel, Q4_0 4k x 4k", ", ".join(ratios) + " (rows time / packed time)")


def _lim(v: int) -> str:
    return "unlimited" if v == resource.RLIM_INFINITY else str(v)


# ----------------------------------------------------------------------------------------------------- matmul types


def _context(rt, m: int, k: int, n: int, t: int, **kw):
    return MatmulContext(rt, m, k, n, t, **kw)


def _matmul_types(rt, rep: Report) -> set[int]:
    """Create every matmul type; run the accepted ones on small random matrices against numpy."""

    rep.section("matmul types (create + run on M=4, small K/N, vs a CPU reference)")
    rng = np.random.default_rng(0)
    accepted: set[int] = set()
    for t, (a_dt, b_dt, c_dt) in MATMUL_TYPES.items():
        label = f"type {t:2d} {a_dt}x{b_dt}->{c_dt}"
        try:
            k, n = rt.chip.padded_align(t)
        except KeyError:
            rep.line(label, "no layout rules for this chip: not offered")
            continue
        k, n = max(k, 64), max(n, 32)
        try:
            ctx = _context(rt, 4, k, n, t)
        except RknnError as e:
            expected = not rt.chip.supports(t)
            rep.line(label, f"refused ({e.__class__.__name__}){'' if expected else ' but the chip table lists it'}",
                     None if expected else False)
            continue
        accepted.add(t)
        with ctx:
            a, b = _operand(rng, a_dt, (4, k)), _operand(rng, b_dt, (k, n))
            try:
                ctx.set_B(b)
                c = ctx(a).astype(np.float64)
            except RknnError as e:
                rep.line(label, f"created, run failed: {e}", False)
                continue
            ref = a.astype(np.float64) @ b.astype(np.float64)
            if c_dt in ("int32", "int16"):
                ok = np.array_equal(c, ref)
                rep.line(label, "exact" if ok else f"differs from the integer product (max {np.abs(c - ref).max()})",
                         ok)
            else:
                rel = float(np.linalg.norm(c - ref) / max(np.linalg.norm(ref), 1e-30))
                tol = {"fp32": 1e-3, "fp16": 2e-3, "bf16": 1e-2, "int8": 0.1}[c_dt]
                rep.line(label, f"relative error {rel:.1e}" + ("" if rel < tol else f" > {tol}"), rel < tol)
        if not rt.chip.supports(t):
            rep.line("", f"type {t} runs but the chip table says refused: update npulm/npu/chips.py", False)
    return accepted


def _operand(rng, dtype: str, shape) -> np.ndarray:
    if dtype == "fp16":
        return rng.standard_normal(shape).astype(np.float16)
    lo, hi = {"int8": (-128, 127), "int4": (-8, 7)}[dtype]
    return rng.integers(lo, hi + 1, shape).astype(np.int8)


# ----------------------------------------------------------------------------------------------------- probes


def write_nibbles(path: str, order: L.NibbleOrder) -> None:
    """Merge {"nibbles": {...}} into the board profile at path (created when absent; its constants kept)."""
    import json

    data = {}
    if os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data["nibbles"] = {"normal": order.normal, "a_native": order.a_native, "b_native": order.b_native}
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def _probes(rt, rep: Report, accepted: set[int], profile: str | None = None) -> None:

    rep.section("probes (what the documentation leaves open)")
    rep.line("types rknn_matmul_create accepts", ", ".join(map(str, sorted(accepted))) or "none",
             bool(accepted) or None)
    t10 = INT4_MM_INT4_TO_INT16
    if t10 in accepted:
        k, n = 64, 128
        with _context(rt, 1, k, n, t10) as mm:
            b = np.zeros((k, n), np.int8)
            b[0, 0] = b[1, 1] = 1  # C[0] = A[0, 0], C[1] = A[0, 1]: which nibble holds element 0
            mm.set_B(b)
            raw = np.zeros(mm.io.A.size, np.uint8)
            raw[0] = 0x3 | (0x5 << 4)  # low nibble 3, high nibble 5
            mm.A.data[: raw.size] = raw
            mm.run()
            c = mm.read_C()[0, :2]
        order = {(3, 5): "low", (5, 3): "high"}.get(tuple(int(v) for v in c))
        rep.line("INT4 A nibble order (even element)", f"{order} nibble" if order else f"unexpected C {c}",
                 order is not None)
        setting = L.nibble_setting(profile)
        if order and order != setting.a_native:
            board = L.NibbleOrder(setting.normal, order, setting.b_native)
            if profile:
                write_nibbles(profile, board)
                rep.line("", f"npulm packs A with the {setting.a_native} nibble first: wrote \"nibbles\" "
                             f"({board.text()}) into {profile}; use it with NPULM_COST_PROFILE={profile}")
            else:
                rep.line("", f"npulm packs A with the {setting.a_native} nibble first: set "
                             f"{L.NIBBLES_ENV}=a_native={order}, or run `npulm doctor --profile PROFILE` to write it",
                         False)
        k = 1024  # 1024 * 7 * 7 = 50176 > 32767
        with _context(rt, 1, k, n, t10) as mm:
            mm.set_B(np.full((k, n), 7, np.int8))
            try:
                v = int(mm(np.full((1, k), 7, np.int8))[0, 0])
                kind = {32767: "saturates", 50176 - 65536: "wraps (two's complement)"}.get(v, f"gives {v}")
            except (RknnError, ArithmeticError) as e:
                kind = f"is an error ({e})"
        rep.line("INT16 overflow (7*7*1024)", kind + "; npulm's K-chunks keep partials below 2^15 either way")
    else:
        rep.line("INT4 probes", "INT4xINT4 not accepted: the 4-bit pipelines run on INT8xINT8")
    t = INT8_MM_INT8_TO_INT32 if INT8_MM_INT8_TO_INT32 in accepted else FLOAT16_MM_FLOAT16_TO_FLOAT32
    for k in (4096, rt.chip.max_k, rt.chip.k_limit, rt.chip.k_limit + 32):
        ok = _creates(rt, MatmulInfo(1, k, 32, t, 1, AC_layout=1))
        expect = k <= rt.chip.k_limit
        rep.line(f"K = {k} (type {t})", "created" if ok else "refused", None if ok == expect else False)
    masks = [CORE_0, CORE_1, CORE_2][: rt.chip.n_cores]
    got = []
    for mask in masks:
        try:
            with _context(rt, 1, 64, 32, t, core_mask=mask):
                got.append(f"{mask:#x} ok")
        except RknnError as e:
            got.append(f"{mask:#x} refused ({e.code})")
    rep.line("core masks", ", ".join(got) if rt.chip.core_masks else "single core (set_core_mask not used)")
    rep.line("A/B/C as views at offsets", *_views_probe(rt, t))
    ok = _creates(rt, MatmulInfo(1, 64, 32, t, 1, AC_layout=1, iommu_domain_id=1))
    rep.line("IOMMU domain 1", "usable" if ok else "refused: models must fit one 4 GB domain")
    try:
        ctx, _ = rt.create_dynamic_shape(MatmulInfo(16, 64, 32, t, 1, AC_layout=1), [(1, 64, 32), (16, 64, 32)])
        rt.destroy(ctx)
        rep.line("dynamic shapes", "supported")
    except RknnError as e:
        rep.line("dynamic shapes", f"not supported ({e.code}); npulm uses one context per M bucket anyway")
    tiles = ", ".join(f"type {t}: {rt.chip.tiles(t)}" for t in sorted(accepted))
    rep.line("native tiles (A sk, B sn, B sk, C sn)", tiles)


def _views_probe(rt, t: int) -> tuple[str, bool]:
    """The planner binds A, B and C as views (rknn_create_mem_from_fd + offset) into shared allocations: run one
    context that way, at 64-byte offsets, and compare with numpy."""
    arena = Arena(rt, parallel=False)
    rng = np.random.default_rng(2)
    try:
        k, n = rt.chip.padded_align(t)
        a_dt = "fp16" if t in (1, 4) else "int8"
        b = _operand(rng, a_dt, (3 * n, 2 * k))
        op = NpuMatmul(arena, b, t, chunk_k=k)
        a = _operand(rng, a_dt, (2, 2 * k))
        c = op.run(a.reshape(2, 2, k).transpose(1, 0, 2)).astype(np.float64).sum(axis=0)
        ref = a.astype(np.float64) @ b.T.astype(np.float64)
        ok = np.allclose(c, ref, rtol=1e-3, atol=1e-2 * np.abs(ref).max())
        op.close()
        return ("work (2 K-chunks x core slices read their slices)" if ok else "WRONG results: planner unusable"), ok
    except RknnError as e:
        return f"refused ({e}): the planner needs them", False
    finally:
        arena.close()


def _creates(rt, info) -> bool:
    try:
        ctx, _ = rt.create(info)
    except RknnError:
        return False
    rt.destroy(ctx)
    return True


# ----------------------------------------------------------------------------------------------------- pipelines


def _pipelines(rt, rep: Report) -> None:
    rep.section("pipelines (N=256, K=512, one Q4_0 / Q8_0 weight, 8 rows with an outlier channel)")
    rng = np.random.default_rng(1)
    w32 = (rng.standard_normal((256, 512)) * 0.05).astype(np.float32)
    weights = {t: Weight(f"doctor.{t.name}", t, 256, 512, gguf.quants.quantize(w32, t)) for t in (Q.Q4_0, Q.Q8_0)}
    x = rng.standard_normal((8, 512)).astype(np.float32)
    x[:, 3] *= 20
    arena = Arena(rt)
    try:
        for name in P.PIPELINES:
            results = [(t, *_pipeline_verdict(name, w, x, arena)) for t, w in weights.items()]
            oks = [ok for _, ok, _ in results if ok is not None]
            rep.line(name, "; ".join(f"{t.name}: {text}" for t, _, text in results), all(oks) if oks else None)
        auto = {t.name: P.auto_pipeline(t, rt.chip) for t in (Q.F16, Q.Q8_0, Q.Q6_K, Q.Q5_0, Q.Q4_K, Q.Q4_0)}
        rep.line("defaults (npu:auto)", ", ".join(f"{k} -> {v}" for k, v in auto.items()))
    finally:
        arena.close()


def _pipeline_verdict(name: str, w, x, arena) -> tuple[bool | None, str]:
    """(ok, text): ok None when the NPU refuses the pipeline (the weight then runs on the CPU path). The pipeline's
    error bound against float64, and equality with its float64 reference (`npulm.npu.simulate`)."""
    pipeline = P.pipeline_spec(P.resolve(name, w.type, arena.chip))
    ref = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    try:
        pr = prepare(pipeline, w, arena)
    except RknnError as e:
        return None, f"refused, runs on the CPU ({e.__class__.__name__})"
    try:
        y = pr(x)
    except RknnError as e:
        pr.close()
        return None, f"run failed, runs on the CPU ({e.__class__.__name__})"
    pr.close()
    err, bound = qm.relative_error(y, ref), pipeline.error_bound
    d = qm.relative_error(y, simulate(pipeline, x, w))
    notes = [f"err {err:.4f}" + ("" if err < bound else f" > {bound}"), pr._npu(),
             "= float64 reference" if d < 1e-5 else f"differs from the float64 reference by {d:.1e}"]
    return err < bound and d < 1e-5, ", ".join(notes)


if __name__ == "__main__":  # python -m npulm.npu.doctor
    ap = argparse.ArgumentParser(prog="npulm doctor")
    add_parser(ap.add_subparsers(dest="command", required=True))
    a = ap.parse_args(["doctor", *sys.argv[1:]])
    sys.exit(a.func(a))

