"""Where each matmul weight runs, and the one place that builds its `Linear`: CPU or an NPU pipeline, per tensor.

A target is parsed once into a `MatmulSpec` (backend, pipeline, options):
  "cpu"          the CPU kernels over the GGUF blocks, activation precision by the tensor's role (npulm.cpu);
                 "cpu:a8" / "cpu:a16" fix it
  "cpu-ref"      the weight dequantized once to float32, BLAS (the reference path)
  "npu:<PIPE>"   an NPU pipeline of the table (npulm.npu.pipelines); a bare pipeline name means the same (as `-ot`
                 and `--pipeline` take it)
  "npu:auto"     the cost model's choice per weight and phase (npulm.plan.auto_choice): the fastest measured
                 pipeline within the accuracy budget from the batch size where it is predicted faster than the CPU,
                 the CPU path below it, or the CPU throughout when the NPU never is; also what `--npu-layers N`
                 places when no pipeline is named
  "npu:<PIPE>@M" per-phase placement: the NPU from M token rows per call up, the CPU path below (one load; `-ngl auto`
                 writes these from the cost model's plan)

Rules, in order (the first that matches wins):
  1. per-tensor overrides: glob pattern on the GGUF name -> a target (e.g. "blk.*.ffn_down.*=cpu")
  2. --npu-layers N, like llama.cpp's -ngl: the last N blocks go to the NPU; N > n_layer also places the output
     matmul; "all" means every block and the output
  3. everything else: `default` ("cpu")
The NPU side of a model is its own `NpuDevice` (runtime, chip, memory), opened on the first NPU weight: two models
never share or change each other's NPU state. A refused NPU weight runs on the CPU Linear handed to it here.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
from dataclasses import dataclass, field

from .cpu import DenseLinear, make_cpu_linear
from .linear import Linear, Weight
from .npu.backend import NpuLinear
from .npu.device import NpuDevice
from .npu.pipelines import PIPELINES, pipeline_spec

_BLOCK = re.compile(r"^blk\.(\d+)\.")
CPU_TARGETS = ("cpu", "cpu:a8", "cpu:a16", "cpu-ref")


@dataclass(frozen=True)
class MatmulSpec:
    """A parsed target: backend "cpu" (options: ("a8",) or ("a16",)), "cpu-ref", or "npu" with a pipeline name of
    the table or "auto", on the NPU from `min_m` token rows per call up. str() gives the canonical text ("cpu:a8",
    "npu:W8A16_HADAMARD", "npu:W16A16@64")."""

    backend: str
    pipeline: str | None = None
    options: tuple[str, ...] = ()
    min_m: int = 1

    def __str__(self) -> str:
        if self.backend == "npu":
            return f"npu:{self.pipeline}" + (f"@{self.min_m}" if self.min_m > 1 else "")
        return ":".join((self.backend, *self.options))


def parse_spec(text: str) -> MatmulSpec:
    """"cpu", "cpu:a8", "cpu:a16", "cpu-ref", "npu:<PIPELINE>", "npu:auto" or a bare pipeline name -> MatmulSpec;
    ValueError naming the known targets otherwise."""
    t = text.strip()
    low = t.lower()
    if low in CPU_TARGETS:
        backend, _, option = low.partition(":")
        return MatmulSpec(backend, None, (option,) if option else ())
    if low.startswith("cpu"):
        raise ValueError(f"unknown CPU target {text!r}; known: {', '.join(CPU_TARGETS)}")
    name = t.split(":", 1)[1] if low.startswith("npu:") else t
    name, _, at = name.partition("@")
    if at and (not at.isdigit() or int(at) < 1):
        raise ValueError(f"{text!r}: the part after '@' must be a token count >= 1 (the NPU from that batch size up)")
    min_m = int(at) if at else 1
    if name.lower() == "auto":
        return MatmulSpec("npu", "auto", min_m=min_m)
    try:
        return MatmulSpec("npu", pipeline_spec(name).name, min_m=min_m)
    except ValueError:
        raise ValueError(f"unknown matmul target {text!r}; known: {', '.join(CPU_TARGETS)}, npu:auto, or a pipeline: "
                         f"{', '.join(PIPELINES)}") from None


def make_linear(weight: Weight, spec: MatmulSpec | str = "cpu", npu: NpuDevice | None = None) -> Linear:
    """The Linear of a weight for a target; NPU targets need the model's NpuDevice."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    if spec.backend == "cpu-ref":
        lin: Linear = DenseLinear(weight)
    elif spec.backend == "cpu":
        lin = make_cpu_linear(weight, spec.options[0] if spec.options else None)
    else:
        if npu is None:
            raise ValueError(f"{weight.name}: target {spec} needs an NPU device (npulm.npu.device.NpuDevice)")
        pipeline, min_m = spec.pipeline, spec.min_m
        if pipeline == "auto":  # the cost model's choice for this weight, per phase (npulm.plan.auto_choice)
            from .plan import auto_choice

            choice = auto_choice(weight, npu.chip)
            if choice.pipeline is None:  # the NPU is predicted slower at every batch size: the CPU path
                lin = make_cpu_linear(weight)
                lin.requested = str(spec)
                return lin
            pipeline, min_m = choice.pipeline, max(min_m, choice.min_m)
        lin = NpuLinear(weight, pipeline, npu, fallback=lambda: make_cpu_linear(weight), min_m=min_m)
    lin.requested = str(spec)
    return lin


def parse_overrides(items: list[str] | None) -> list[tuple[str, str]]:
    """['pattern=target', ...] (commas also separate) -> [(pattern, target)]."""
    out = []
    for item in items or []:
        for part in item.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"tensor override {part!r} must look like PATTERN=cpu or PATTERN=<pipeline>")
            pattern, target = (s.strip() for s in part.split("=", 1))
            out.append((pattern, target))
    return out


@dataclass
class Placement:
    """The placement of one model: rules -> a MatmulSpec per weight, and the Linears built from them. `npu` is the
    model's NPU device (opened with `chip` on the first NPU weight when not given)."""

    n_layer: int = 0
    npu_layers: int | str = 0  # int or "all"
    pipeline: str | None = None  # None = by GGUF type
    overrides: list[tuple[str, str]] = field(default_factory=list)
    default: str = "cpu"
    chip: str | None = None
    npu: NpuDevice | None = None

    def __post_init__(self) -> None:
        if self.npu_layers != "all" and not isinstance(self.npu_layers, int):
            raise ValueError(f"npu_layers must be a number of blocks or 'all', not {self.npu_layers!r} ('auto' is "
                             "resolved into per-tensor targets before placement: npulm.plan.auto_specs)")
        self._npu_spec = MatmulSpec("npu", "auto" if self.pipeline is None else parse_spec(self.pipeline).pipeline)
        if self._npu_spec.pipeline is None:
            raise ValueError(f"--pipeline takes an NPU pipeline, not {self.pipeline!r}")
        self._rules = [(pattern, parse_spec(target)) for pattern, target in self.overrides]
        self._default = parse_spec(self.default)

    def spec_for(self, weight: Weight) -> MatmulSpec:
        for pattern, spec in self._rules:
            if fnmatch.fnmatchcase(weight.name, pattern):
                return spec
        n = self.n_layer + 1 if self.npu_layers == "all" else int(self.npu_layers)
        if n <= 0:
            return self._default
        m = _BLOCK.match(weight.name)
        if m:
            return self._npu_spec if int(m.group(1)) >= self.n_layer - n else self._default
        return self._npu_spec if n > self.n_layer else self._default  # the output matmul

    def build(self, weight: Weight, spec: MatmulSpec | str | None = None) -> Linear:
        """The Linear of a weight, for `spec` or the rules' target."""
        spec = self.spec_for(weight) if spec is None else parse_spec(spec) if isinstance(spec, str) else spec
        if spec.backend == "npu" and self.npu is None:
            self.npu = NpuDevice(self.chip)
        return make_linear(weight, spec, self.npu if spec.backend == "npu" else None)


def table(linears: list[Linear]) -> list[tuple[str, str, str, str, str, str]]:
    """(tensor, type and shape, requested target, where it runs, NPU split, note) per weight tensor: `npulm info
    --placement`. The split reads "C cores x K K-chunks = R runs/call (<= M rows)"; the experts of a 3-D tensor
    (one Linear each, placed alike) make one row, "x E" after the shape."""
    rows: list[tuple[str, str, str, str, str, str]] = []
    seen: dict[str, int] = {}
    for lin in linears:
        if lin.name in seen:  # another expert of the same 3-D tensor
            i = seen[lin.name]
            name, shape, *rest = rows[i]
            n = int(shape.rsplit(" x ", 1)[1]) + 1 if " x " in shape else 2
            rows[i] = (name, f"{shape.rsplit(' x ', 1)[0]} x {n}", *rest)
            continue
        seen[lin.name] = len(rows)
        split = lin.split() if hasattr(lin, "split") else None
        where = (f"{split[0]} core{'s' * (split[0] > 1)} x {split[1]} K-chunk{'s' * (split[1] > 1)} = {split[2]} "
                 f"runs/call (<= {split[3]} rows)" if split else "")
        note = getattr(lin, "refused", None) or ""
        rows.append((lin.name, f"{lin.type.name} {lin.n_out}x{lin.n_in}", lin.requested, lin.runs_on, where, note))
    return rows


def add_arguments(p: argparse.ArgumentParser, lists: bool = False) -> None:
    """The placement flags (-ngl, --pipeline, -ot, --chip), declared once for every command. lists: -ngl and
    --pipeline take comma lists and repeat (`npulm bench` runs their product)."""
    several = dict(action="append", default=None) if lists else dict(default=None)
    each = " (comma list)" if lists else ""
    p.add_argument("-ngl", "--npu-layers", "--n-gpu-layers", dest="npu_layers",
                   **(several if lists else dict(type=npu_layers_arg, default=0)),
                   help="number of last blocks whose matmuls run on the NPU, 'all' (as llama.cpp's -ngl), or 'auto' "
                        f"(the cost model's plan per tensor and phase: `npulm plan`){each}")
    p.add_argument("--pipeline", **several,
                   help=f"NPU pipeline{each}: {', '.join(PIPELINES)}; default: by GGUF type")
    p.add_argument("-ot", "--override-tensor", action="append", default=None, metavar="PATTERN=TARGET",
                   help="place tensors matching a glob on 'cpu', 'cpu:a8' (int8 activations, fastest), 'cpu:a16', "
                        "'cpu-ref' or an NPU pipeline (repeatable)")
    p.add_argument("--chip", default=None, help="NPU chip (rk3588, rk3576, ...); detected on a board")


def npu_layers_arg(text: str) -> int | str:
    """-ngl's value: a number of blocks >= 0, 'all' or 'auto' (argparse's type)."""
    if text.strip().lower() in ("all", "auto"):
        return text.strip().lower()
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of layers or 'all' (or 'auto'), got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number of layers >= 0 or 'all' (or 'auto'), got {v}")
    return v
