"""`npulm plan`: predicted speed of a model on a Rockchip SoC for the CPU, for each NPU pipeline on every block, and
for the best placement per tensor and per phase within an accuracy budget; `-ngl auto` and `npu:auto` use it.

The speed comes from the cost model (`npulm.npu.cost`: published RK3588 / RK3576 figures, or a board profile from
`npulm doctor --calibrate`), the host work per pipeline from npulm's own measurement (`npulm.npu.host_cost`), and the
accuracy of each pipeline from measurements (`npulm.npu.accuracy_measured`, written by benchmarks/accuracy.py; a
pipeline without a measurement is never chosen within a budget). A placement puts a weight on the NPU for M >= a
threshold (prefill, batches) and on the CPU below it, so no phase runs where the model predicts it slower than
the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from dataclasses import dataclass

from .npu import cost as C

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DEFAULT_MAX_KLD = 0.002  # the accuracy target for a default placement (mean KLD vs the float reference)


def chip_for(name: str | None):
    from .npu.chips import get_chip

    return get_chip(name or "rk3588")


def host_cost(pipeline: str, c: dict[str, float]) -> C.HostCost:
    """npulm's measured host time per invocation, scaled from the development VM to the board's CPU."""
    from .npu.host_cost import HOST_COST
    from .npu.pipelines import C_HOST

    per_call, per_elem = HOST_COST.get(pipeline, max(HOST_COST.values()))
    f = c["host_a76_factor"]
    threads = c["host_threads"] if pipeline in C_HOST else 1.0  # numpy host work runs on one thread
    return C.HostCost(per_call * f, per_elem * f / threads)


def measured_accuracy(pipeline: str, model: str = "") -> tuple[float, float] | None:
    """(ΔPPL % vs the CPU path, mean KLD) as measured on this model when it is one of the measured ones, else the
    worst over the measured models; None when the pipeline was never measured."""
    from .npu.accuracy_measured import MEASURED

    vals = [v for (p, _), v in MEASURED.items() if p == pipeline]
    key = model.lower().replace("-", "").replace("_", "")
    own = [v for (p, m), v in MEASURED.items() if p == pipeline and m.split("-")[0].replace("_", "") in key]
    vals = own or vals
    if not vals:
        return None
    return max(v[0] for v in vals), max(v[1] for v in vals)


def pipeline_names() -> list[str]:
    from .npu.pipelines import PIPELINES

    return list(PIPELINES)


@dataclass(frozen=True)
class Choice:
    """Where one weight runs: `pipeline` on the NPU for M >= min_m tokens, the CPU below (pipeline None: CPU)."""

    pipeline: str | None = None
    min_m: int = 1

    def spec(self) -> str:
        if self.pipeline is None:
            return "cpu"
        return f"npu:{self.pipeline}" + (f"@{self.min_m}" if self.min_m > 1 else "")


class Planner:
    """Times of every (weight group, placement) of one model on one chip."""

    def __init__(self, shape: C.ModelShape, chip=None, profile: str | None = None):
        self.shape, self.chip = shape, chip or chip_for(None)
        self.c = C.constants(self.chip.name, profile)
        self._geo: dict[tuple, C.Geometry | None] = {}

    def geometry(self, pipeline: str, li: C.LinearShape) -> C.Geometry | None:
        key = (pipeline, li.k, li.n, li.qtype)
        if key not in self._geo:
            try:
                self._geo[key] = C.npulm_geometry(pipeline, li.k, li.n, li.qtype, self.chip)
            except (ValueError, KeyError, OSError) as e:  # the chip refuses the pipeline's matmul type
                if "refus" not in str(e) and "accepts none" not in str(e) and not isinstance(e, KeyError):
                    raise
                self._geo[key] = None
        return self._geo[key]

    def linear_time(self, li: C.LinearShape, choice: Choice, m: int) -> float:
        if choice.pipeline is None or m < choice.min_m:
            return C.cpu_linear_time(self.c, li, m)
        g = self.geometry(choice.pipeline, li)
        if g is None:
            return C.cpu_linear_time(self.c, li, m)
        return C.npu_time(self.c, g, m, host_cost(choice.pipeline, self.c))

    def threshold(self, pipeline: str, li: C.LinearShape) -> int | None:
        """The smallest bucket M from which the NPU is predicted faster than the CPU for every larger bucket, or
        None when it never is (up to 512 rows)."""
        best = None
        for m in reversed(BUCKETS):
            npu = self.linear_time(li, Choice(pipeline), m)
            if npu < C.cpu_linear_time(self.c, li, m):
                best = m
            else:
                break
        return best

    def speeds(self, choices: dict[C.LinearShape, Choice], p: int, n: int) -> dict[str, float]:
        """pp (tok/s over a p-token prompt) and tg (tok/s decoding) for a placement of the block linears; the output
        matmul and the per-layer work on the CPU."""
        s, c = self.shape, self.c
        t_pp = sum(li.count * self.linear_time(li, choices.get(li, Choice()), p) for li in s.linears)
        t_tg = sum(li.count * self.linear_time(li, choices.get(li, Choice()), 1) for li in s.linears)
        out = C.cpu_linear_time(c, s.output, 1)
        return {"pp_tok_s": p / (t_pp + out + C.prefill_cpu_time(c, s, p)),
                "tg_tok_s": 1.0 / (t_tg + out + s.n_layer * c["cpu_layer_s"])}

    def stats(self, choices: dict[C.LinearShape, Choice]) -> dict[str, float]:
        """Decode calls per token (block linears), the longest per-core chain, NPU bytes per block parameter."""
        calls = serial = 0
        npu_bytes = 0
        for li in self.shape.linears:
            ch = choices.get(li, Choice())
            g = self.geometry(ch.pipeline, li) if ch.pipeline else None
            if g is None:
                continue
            npu_bytes += li.count * g.b_bytes
            if ch.min_m <= 1:
                calls += li.count * g.calls(1)
                serial += li.count * g.serial_calls(1)
        contexts = sum(li.count * self.geometry(ch.pipeline, li).calls(1) for li, ch in choices.items()
                       if ch.pipeline and self.geometry(ch.pipeline, li) is not None)
        return {"calls_per_token": calls, "serial_calls_per_token": serial,
                "npu_bytes_per_param": npu_bytes / self.shape.block_params,
                "contexts": contexts, "mem_views": 3 * contexts}  # per M bucket in use (planner: 3 views each)

    def kld(self, choices: dict[C.LinearShape, Choice]) -> float | None:
        """Estimated mean KLD of a placement: each pipeline's measured whole-model KLD times the share of block
        parameters it holds (None when a chosen pipeline was never measured)."""
        total = 0.0
        for li, ch in choices.items():
            if ch.pipeline is None:
                continue
            acc = measured_accuracy(ch.pipeline, self.shape.name)
            if acc is None:
                return None
            total += acc[1] * li.k * li.n * li.count / self.shape.block_params
        return total

    def best(self, p: int, n: int, max_kld: float = DEFAULT_MAX_KLD,
             pipelines: list[str] | None = None) -> dict[C.LinearShape, Choice]:
        """Per weight group the placement that saves the most time on a p-token prompt plus n generated tokens,
        greedily by time saved per KLD spent, within max_kld. Each pipeline runs from its crossover M upward."""
        options = []
        for li in self.shape.linears:
            t_cpu = C.cpu_linear_time(self.c, li, p) + n * C.cpu_linear_time(self.c, li, 1)
            for name in pipelines or pipeline_names():
                acc = measured_accuracy(name, self.shape.name)
                if acc is None or self.geometry(name, li) is None:
                    continue
                m0 = self.threshold(name, li)
                if m0 is None or m0 > p:
                    continue
                ch = Choice(name, m0)
                saved = li.count * (t_cpu - self.linear_time(li, ch, p) - n * self.linear_time(li, ch, 1))
                cost = acc[1] * li.k * li.n * li.count / self.shape.block_params
                if saved > 0:
                    options.append((saved / (cost + 1e-9), saved, cost, li, ch))
        choices: dict[C.LinearShape, Choice] = {}
        spent = 0.0
        saved_by: dict[C.LinearShape, tuple[float, float]] = {}
        for _, saved, cost, li, ch in sorted(options, key=lambda o: -o[0]):
            prev = saved_by.get(li)
            if prev is not None and prev[0] >= saved:
                continue
            extra = cost - (prev[1] if prev else 0.0)
            if spent + extra > max_kld + 1e-12:
                continue
            choices[li], saved_by[li] = ch, (saved, cost)
            spent += extra
        return choices

    def rows(self, p: int = 512, n: int = 128, max_kld: float = DEFAULT_MAX_KLD) -> list[dict]:
        """One row for the CPU, one per pipeline on every block linear, and the best plan."""
        cpu = self.speeds({}, p, n)
        out = [{"name": "cpu", **cpu, **self.stats({}), "dppl_pct": 0.0, "kld": 0.0}]
        for name in pipeline_names():
            choices = {li: Choice(name) for li in self.shape.linears if self.geometry(name, li) is not None}
            if not choices:
                continue
            acc = measured_accuracy(name, self.shape.name)
            out.append({"name": name, **self.speeds(choices, p, n), **self.stats(choices),
                        "dppl_pct": None if acc is None else acc[0], "kld": None if acc is None else acc[1]})
        best = self.best(p, n, max_kld)
        out.append({"name": "plan", **self.speeds(best, p, n), **self.stats(best), "dppl_pct": None,
                    "kld": self.kld(best),
                    "placement": {f"{li.role}[{li.qtype}] {li.k}x{li.n}": ch.spec() for li, ch in best.items()}})
        for r in out:
            r["pp_vs_cpu"] = r["pp_tok_s"] / cpu["pp_tok_s"]
            r["tg_vs_cpu"] = r["tg_tok_s"] / cpu["tg_tok_s"]
        return out


def auto_specs(gguf_path, chip=None, p: int = 512, n: int = 128, max_kld: float = DEFAULT_MAX_KLD) -> dict[str, str]:
    """Tensor name -> spec for every block weight the best plan puts on the NPU (`-ngl auto`)."""
    from .gguf import GGUFFile

    shape = C.ModelShape.from_gguf(gguf_path)
    best = Planner(shape, chip).best(p, n, max_kld)
    by_key = {(li.role, li.k, li.n, li.qtype): ch for li, ch in best.items() if ch.pipeline}
    out = {}
    for name, t in GGUFFile(gguf_path).tensors.items():
        if name.startswith("blk.") and len(t.shape) == 2:
            ch = by_key.get((name.split(".")[2], t.shape[0], t.shape[1], t.type.name))
            if ch is not None:
                out[name] = ch.spec()
    return out


def auto_choice(weight, chip, max_kld: float = DEFAULT_MAX_KLD) -> Choice:
    """`npu:auto` (and the NPU layers of `-ngl N` without a pipeline) for one weight: the fastest measured pipeline
    whose whole-model KLD is within max_kld, on the NPU from its crossover M (the CPU path below it: decode stays on
    the CPU where the NPU is predicted slower); the CPU when no pipeline is ever predicted faster. The cost model's
    constants are the chip's published ones or the board profile in $NPULM_COST_PROFILE; a chip without a cost
    model gets the GGUF type's default pipeline (`pipelines.auto_pipeline`) for every M."""
    if chip.name not in C.CONSTANTS:  # no cost model for this chip (RK3566/68, RK3562): the GGUF type's default
        from .npu.pipelines import auto_pipeline

        return Choice(auto_pipeline(weight.type, chip))
    role = weight.name.split(".")[2] if weight.name.startswith("blk.") else weight.name
    profile = os.environ.get("NPULM_COST_PROFILE") or None
    stamp = os.path.getmtime(profile) if profile else None
    return _auto_choice(role, weight.n_in, weight.n_out, weight.type.name, chip.name, max_kld, profile, stamp)


@functools.lru_cache(maxsize=4096)
def _auto_choice(role: str, k: int, n: int, qtype: str, chip_name: str, max_kld: float, profile: str | None,
                 stamp: float | None) -> Choice:
    li = C.LinearShape(role, k, n, qtype)
    shape = C.ModelShape("one weight", 1, (li,), C.LinearShape("output", 1, 1, "F16"), 1)
    pl = Planner(shape, chip_for(chip_name), profile)
    best, best_t = Choice(), C.cpu_linear_time(pl.c, li, 512)
    for name in pipeline_names():
        acc = measured_accuracy(name)
        if acc is None or acc[1] > max_kld or pl.geometry(name, li) is None:
            continue
        m0 = pl.threshold(name, li)
        if m0 is None:
            continue
        t = pl.linear_time(li, Choice(name, m0), 512)
        if t < best_t:
            best, best_t = Choice(name, m0), t
    return best


# ----------------------------------------------------------------------------------------------------- CLI


def _fmt(v, digits=1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def markdown(rows: list[dict], title: str) -> str:
    out = [title, "", "| placement | pp tok/s | x CPU | tg tok/s | x CPU | calls/token | serial | NPU B/param | "
           "ΔPPL % (measured) | KLD (measured) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kld = "-" if r["kld"] is None else f"{r['kld']:.5f}"
        out.append(f"| {r['name']} | {r['pp_tok_s']:.0f} | {r['pp_vs_cpu']:.2f} | {r['tg_tok_s']:.1f} | "
                   f"{r['tg_vs_cpu']:.2f} | {r['calls_per_token']} | {r['serial_calls_per_token']} | "
                   f"{r['npu_bytes_per_param']:.3f} | {_fmt(r['dppl_pct'], 2)} | {kld} |")
    plan = rows[-1].get("placement") or {}
    out += ["", "plan: " + (", ".join(f"{k} -> {v}" for k, v in sorted(plan.items())) or "every weight on the CPU")]
    budget = handle_budget()
    for r in rows:
        if r["mem_views"] > budget:
            out.append(f"warning: {r['name']} creates {r['contexts']} contexts and {r['mem_views']} memory views per "
                       f"batch size, over this machine's budget of {budget} (open files / ~64k DMA handles)")
    return "\n".join(out)


DMA_HANDLES = 64 * 1024  # "RKNPU DMA handle space ~64k" (Mojo24x7 BENCHMARKS.md 8)


def handle_budget() -> int:
    """Memory views a process may hold: the open-file limit (one fd per NPU allocation) and the DMA handle space."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return DMA_HANDLES if soft == resource.RLIM_INFINITY else min(int(soft), DMA_HANDLES)


def resolve_shape(model: str | None) -> C.ModelShape:
    """A GGUF file or known model name, or a published shape "name:TYPE" (e.g. qwen2_5_1_5b:Q4_0)."""
    from . import assets

    if model and ":" in model and not model.endswith(".gguf"):
        name, qtype = model.split(":", 1)
        return C.published_shape(name, qtype.upper())
    return C.ModelShape.from_gguf(assets.resolve_model(model))


def cmd_plan(args: argparse.Namespace) -> int:
    chip = chip_for(args.chip)
    shape = resolve_shape(args.model)
    rows = Planner(shape, chip, args.profile).rows(args.n_prompt, args.n_gen, args.max_kld)
    if args.output == "json":
        json.dump(rows, sys.stdout, indent=1)
        print()
    else:
        print(markdown(rows, f"{shape.name} on {chip.name}: predicted pp{args.n_prompt} / tg{args.n_gen} "
                             f"(cost model; KLD budget {args.max_kld})"))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="predicted NPU/CPU speed per placement, and the best placement (cost model)")
    p.add_argument("-m", "--model", default=None, help="GGUF file, known model, or a published shape NAME:TYPE")
    p.add_argument("--chip", default="rk3588")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("--max-kld", type=float, default=DEFAULT_MAX_KLD, help="accuracy budget (measured mean KLD)")
    p.add_argument("--profile", default=None, help="board profile from `npulm doctor --calibrate`")
    p.add_argument("-o", "--output", choices=("md", "json"), default="md")
    p.set_defaults(func=cmd_plan)
