"""What a matmul costs on a Rockchip SoC: the NPU (per call), the host work around it, and the CPU (llama.cpp).

One table of constants per chip (`CONSTANTS`), each with its source. Constants marked "fit:" are solved from the
published rows in `FIT_ROWS` (one constant per row, in order); every other published row (`HELD_OUT`) is a check
the model never saw (`python -m npulm.npu.cost` prints predicted / published for all of them).

The model:
  * an NPU call on one core = launch + rows x row cost + max(B bytes / bandwidth per core, 2 x rows x chunk_k x
    N_core / ops(type, layout, chunk_k)); a core runs its K-chunks in turn, the cores run in parallel (the
    longest chain counts), the cores share the DRAM bandwidth (bw_total / active cores, at most bw_core);
  * host work per call = per_call + per_element x (A values written + C values read), from the implementation's
    measured cost (npulm: `HOST_COST`, measured on the x86 VM and scaled to the A76 by `host_a76_factor`);
  * the CPU (llama.cpp, 4 x A76): decode streams every weight once per token at cpu_bw plus a fixed cost per layer;
    prefill is compute-bound at cpu_ops(type) for the matmuls and cpu_attn_ops for attention (llama-bench computes
    the full masked n_batch x n_batch scores without flash attention);
  * a token = its block linears (CPU or NPU each) + the output matmul + the per-layer CPU work (decode: a fitted
    time per layer; prefill: attention and the other ops' activation passes at cpu_bw, `prefill_cpu_time`).
A board profile written by `npulm doctor --calibrate` (JSON {"constants": {name: value}}) replaces the published
values: `constants(chip, profile=path)` or $NPULM_COST_PROFILE.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from gguf.constants import GGML_QUANT_SIZES
from gguf.constants import GGMLQuantizationType as Q


@dataclass(frozen=True)
class Const:
    value: float
    unit: str
    source: str


_F = "npu-facts-2026-12.md"
_A = "rknn-matmul-api.md"
_P = "prior-art.md"

# fitted values start as None and are solved from FIT_ROWS (in this order) on first use
CONSTANTS: dict[str, dict[str, Const]] = {
    "rk3588": {
        "npu_cores": Const(3, "", "TRM: 3 NPU cores; one matmul context = one core (CORE_0_1_2 refused for matmul)"),
        "launch_s": Const(32.9e-6, "s", f"{_F} 1.3: unimatrix rknpu2-run-latency-probe, fixed cost per run"),
        "bw_core": Const(11.1e9, "B/s", f"{_F} 1.4: INT8 M=1 one core (unimatrix)"),
        "bw_total": Const(26.6e9, "B/s", f"{_F} 1.4: INT8 M=1 on three cores (unimatrix)"),
        "ops_int8_native": Const(1.876e12, "op/s/core", f"{_A} 8.2: wtwver M=128 one core, native: the marginal "
                                                        "rate from K=N=1024 (263 us) to K=N=4096 (2.41 ms)"),
        "ops_fp16_native": Const(0.952e12, "op/s/core", f"{_A} 8.2: wtwver M=128 one core: marginal rate from "
                                                        "K=N=1024 (420 us) to K=N=2048 (1266 us)"),
        "ops_fp16_native_k4096": Const(0.50e12, "op/s/core", f"{_A} 8.2: wtwver K=N=4096 (fp16 collapses, K>=4096)"),
        "ops_fp16_native_k8192": Const(0.27e12, "op/s/core", f"{_A} 8.2: wtwver K=N=8192"),
        "ops_int4_native": Const(3.88e12, "op/s/core", f"{_A} 8.2: wtwver M=128 one core: marginal rate from "
                                                       f"K=N=1024 (193 us) to K=N=4096 (1.23 ms); {_F} 1.4: 3.6-3.9"),
        "npu_row_s": Const(0.68e-6, "s/row", f"{_A} 8.2: wtwver M=128: what a call costs beyond launch + ops at the "
                                             "marginal rate, per A row (INT8 K=N=1024: 87 us / 128 rows; FP16 0.82, "
                                             "INT4 0.71 us/row; checks: INT8 K=N=2048 692 vs 703 us, K=2048 N=8192 "
                                             "2.41 vs 2.39 ms)"),
        "ops_int8_norm": Const(None, "op/s/core", "fit: Mojo24x7 BENCHMARKS.md 6, INT8 K=2048 N=768 3 cores, M=1024"),
        "ops_int4_norm": Const(None, "op/s/core", "fit: Mojo24x7 BENCHMARKS.md 6, INT4 K=2048 N=768 3 cores, M=1024"),
        "ops_fp16_norm_ratio": Const(None, "", "[I] normal A/C costs fp16 what it costs int8: ops_int8_norm / "
                                              "ops_int8_native"),
        "runtime_call_s": Const(None, "s", "fit: Mojo24x7 BENCHMARKS.md 6, INT8 K=2048 N=768 M=1 (0.163 ms): "
                                           "librknnrt's normal-layout relayout + the bench's dispatch per call"),
        "cpu_bw": Const(22.9e9, "B/s", f"{_P} 0 / Mojo24x7 BENCHMARKS.md 8: 4 x A76 pinned, 22.94 GB/s"),
        "cpu_layer_s": Const(None, "s", "fit: rk-llama.cpp README, Ministral3-3B Q8_0 CPU tg 6.1"),
        "cpu_attn_ops": Const(None, "op/s", "[I] = cpu_ops_q8_0 (llama.cpp's F16 KQ / KQV vec-dot loops)"),
        "cpu_ops_q8_0": Const(None, "op/s", "fit: rk-llama.cpp README, Ministral3-3B Q8_0 CPU pp 17.5"),
        "cpu_ops_f16_ratio": Const(1.0, "", "[I] F16 and Q8_0 both run llama.cpp's vec-dot loops on A76 (no i8mm, "
                                            "no repack): same rate"),
        "cpu_ops_q4_0_ratio": Const(1.9, "", "llama.cpp PR 17494 (-mcpu=cortex-a76+dotprod): repacked 4-bit GEMM "
                                             "1.88-1.94x the plain path; Q4_0 is repacked on dotprod CPUs"),
        "ggml_host_elem_s": Const(None, "s", "fit: rk-llama.cpp README, Ministral3-3B Q8_0 NPU pp 120.9 with "
                                             "cpu_attn_ops = cpu_ops_q8_0 ([I], one row for two unknowns)"),
        "rkllm_layer_s": Const(None, "s", "fit: RKLLM benchmark.md v1.3.0, Qwen3-0.6B w8a8 decode 32.91 (the "
                                          "closed runtime's CPU work per layer and token)"),
        "host_a76_factor": Const(1.5, "", "[I] npulm's host work is numpy memory passes: a 2.35 GHz A76 with "
                                          "~23 GB/s DRAM vs this x86 VM core (~2x the single-core bandwidth)"),
        "host_threads": Const(1.72, "", "measured: `benchmarks/npu_overhead.py --scaling 1,2` on the 2-core dev VM "
                                        "(shared): a whole layer's C host work at M=512 ran 1.46x faster on 2 threads "
                                        "(Gemma-3-270M layer, load 2.6; 1.0-1.1x for the 1.5B layer and under load "
                                        "4-5, numpy copy 1.72x); parallel fraction 2(1 - 1/1.46) = 0.63 -> 3 of the 4 "
                                        "A76 cores [I] Amdahl 1/(0.37 + 0.63/3) = 1.72 (doctor --calibrate measures "
                                        "the board's)"),
    },
    "rk3576": {
        "npu_cores": Const(2, "", f"{_A}: RK3576 2 NPU cores"),
        "launch_s": Const(32.9e-6, "s", "[I] same driver and runtime as RK3588"),
        "bw_core": Const(11.1e9, "B/s", "[I] as RK3588 per core"),
        "bw_total": Const(None, "B/s", "fit: RKLLM benchmark.md v1.3.0 RK3576, TinyLLaMA-1.1B w8a8 decode 12.18"),
        "ops_int8_native": Const(1.876e12, "op/s/core", "[I] as RK3588 per core (6 TOPS class)"),
        "ops_fp16_native": Const(0.952e12, "op/s/core", "[I] as RK3588"),
        "ops_fp16_native_k4096": Const(0.50e12, "op/s/core", "[I] as RK3588"),
        "ops_fp16_native_k8192": Const(0.27e12, "op/s/core", "[I] as RK3588"),
        "ops_int4_native": Const(0.952e12, "op/s/core", "[I] FP16xINT4 runs at the fp16 MAC rate (no INT4xINT4)"),
        "npu_row_s": Const(0.68e-6, "s/row", "[I] as RK3588"),
        "ops_int8_norm": Const(0.52e12, "op/s/core", "[I] as RK3588"),
        "ops_int4_norm": Const(0.04e12, "op/s/core", "[I] as RK3588"),
        "ops_fp16_norm_ratio": Const(0.29, "", "[I] as RK3588"),
        "runtime_call_s": Const(71e-6, "s", "[I] as RK3588"),
        "cpu_bw": Const(17e9, "B/s", "[I] 4 x A72 with LPDDR4x/5: below RK3588's 22.9 (no published row)"),
        "cpu_layer_s": Const(0.19e-3, "s", "[I] as RK3588"),
        "cpu_attn_ops": Const(64e9, "op/s", "[I] half RK3588's: A72 has no dot product instructions"),
        "cpu_ops_q8_0": Const(64e9, "op/s", "[I] half RK3588's: A72 has no sdot"),
        "cpu_ops_f16_ratio": Const(0.5, "", "[I] A72 has no fp16 arithmetic"),
        "cpu_ops_q4_0_ratio": Const(1.0, "", "[I] no dotprod repack on A72"),
        "ggml_host_elem_s": Const(0.8e-9, "s", "[I] as RK3588"),
        "rkllm_layer_s": Const(0.05e-3, "s", "[I] as RK3588"),
        "host_a76_factor": Const(2.0, "", "[I] A72 slower than A76"),
        "host_threads": Const(1.72, "", "[I] as RK3588 (4 big cores)"),
    },
}


# ----------------------------------------------------------------------------------------------------- shapes


def type_bytes(qtype: str | Q) -> float:
    """Bytes per parameter of a GGUF type."""
    t = Q[qtype] if isinstance(qtype, str) else Q(qtype)
    block, size = GGML_QUANT_SIZES[t]
    return size / block


@dataclass(frozen=True)
class LinearShape:
    role: str
    k: int
    n: int
    qtype: str  # GGUF type name
    count: int = 1  # how many layers hold it (x experts for a mixture-of-experts matrix)
    experts: int = 0  # a mixture of experts: matrices per layer; `used` of them chosen per token
    used: int = 0

    def expert_runs(self, m: int) -> tuple[float, int]:
        """(experts that run per layer, their M) for a call of m tokens grouped per expert as npulm.models.moe runs
        them: of E experts each chosen by a token with probability used / E, E (1 - (1 - used/E)^m) run."""
        active = self.experts * (1.0 - (1.0 - self.used / self.experts) ** m)
        return active, max(1, round(m * self.used / active))


@dataclass(frozen=True)
class ModelShape:
    name: str
    n_layer: int
    linears: tuple[LinearShape, ...]  # block linears (count = layers holding each)
    output: LinearShape  # the output matmul (lm head)
    q_dim: int  # n_head x head_dim (attention work)
    tied: bool = True
    n_head: int = 0  # attention heads (0: q_dim / 64): the attention scores per token are n_kv x n_head

    def dims(self) -> tuple[int, int, int, int]:
        """(d_model, q_dim, kv_dim, ffn width per token) for the per-layer activation passes."""
        by_role = {li.role: li for li in self.linears}
        kv = by_role["attn_k"].n if "attn_k" in by_role else self.q_dim
        ffn = max([li.n * max(1, li.used) for li in self.linears if li.role.startswith(("ffn_up", "ffn_gate"))]
                  or [0])
        return self.output.k, self.q_dim, kv, ffn

    @property
    def heads(self) -> int:
        return self.n_head or max(1, self.q_dim // 64)

    @property
    def block_params(self) -> int:
        return sum(li.k * li.n * li.count for li in self.linears)

    @classmethod
    def dense(cls, name: str, *, d: int, layers: int, ffn: int, q: int, kv: int, vocab: int, qtype: str,
              out_type: str | None = None, tied: bool = True, heads: int = 0) -> ModelShape:
        """A llama-style decoder (gated FFN) with every block linear of one GGUF type."""
        if out_type is None:  # llama.cpp quantize: the output gets Q6_K (Q8_0 when d % 256) for 4-bit files
            out_type = qtype if qtype in ("F16", "F32", "BF16", "Q8_0") else ("Q6_K" if d % 256 == 0 else "Q8_0")
        roles = [("attn_q", d, q), ("attn_k", d, kv), ("attn_v", d, kv), ("attn_output", q, d),
                 ("ffn_gate", d, ffn), ("ffn_up", d, ffn), ("ffn_down", ffn, d)]
        return cls(name, layers, tuple(LinearShape(r, k, n, qtype, layers) for r, k, n in roles),
                   LinearShape("output", d, vocab, out_type), q, tied, heads)

    @classmethod
    def from_gguf(cls, path) -> ModelShape:
        """The shapes and types of a GGUF model's matmul weights."""
        from ..gguf import GGUFFile

        g = GGUFFile(path)
        arch = g.kv.get("general.architecture", "llama")
        n_layer = int(g.kv.get(f"{arch}.block_count", 0))
        heads = int(g.kv.get(f"{arch}.attention.head_count", 0) or 0)
        groups: dict[tuple[str, int, int, str], int] = {}
        experts: dict[tuple[str, int, int, str], int] = {}  # 3-D expert tensors (k, n, n_expert): per layer
        for name, t in g.tensors.items():
            if not name.startswith("blk.") or len(t.shape) not in (2, 3) or not name.endswith(".weight"):
                continue
            role = name.split(".")[2]
            key = (role, t.shape[0], t.shape[1], t.type.name)
            groups[key] = groups.get(key, 0) + (t.shape[2] if len(t.shape) == 3 else 1)
            if len(t.shape) == 3:
                experts[key] = t.shape[2]
        used = int(g.kv.get(f"{arch}.expert_used_count", 0) or 0)
        linears = tuple(LinearShape(r, k, n, ty, c, experts.get((r, k, n, ty), 0), used if (r, k, n, ty) in experts
                                    else 0) for (r, k, n, ty), c in sorted(groups.items()))
        tied = "output.weight" not in g.tensors
        out = g.tensors["token_embd.weight" if tied else "output.weight"]
        q_dim = next((li.n for li in linears if li.role == "attn_q"), heads * 64)
        stem = os.path.basename(str(path)).rsplit(".", 1)[0]
        return cls(stem, n_layer, linears, LinearShape("output", out.shape[0], out.shape[1], out.type.name), q_dim,
                   tied, heads)


# Published models' shapes (HF config.json values); "[I]" where recalled rather than read.
def published_shape(name: str, qtype: str) -> ModelShape:
    d = dict(
        granite4_350m=dict(d=1024, layers=28, ffn=2048, q=1024, kv=256, vocab=100352, heads=16),
        gemma3_1b=dict(d=1152, layers=26, ffn=6912, q=1024, kv=256, vocab=262144, heads=4),
        ministral3_3b=dict(d=3072, layers=26, ffn=9216, q=4096, kv=1024, vocab=131072, heads=32),
        qwen2_0_5b=dict(d=896, layers=24, ffn=4864, q=896, kv=128, vocab=151936, heads=14),
        qwen3_0_6b=dict(d=1024, layers=28, ffn=3072, q=2048, kv=1024, vocab=151936, heads=16),
        tinyllama_1_1b=dict(d=2048, layers=22, ffn=5632, q=2048, kv=256, vocab=32000, tied=False,
                            heads=32),
        qwen2_5_1_5b=dict(d=1536, layers=28, ffn=8960, q=1536, kv=256, vocab=151936, heads=12),
        smollm2_135m=dict(d=576, layers=30, ffn=1536, q=576, kv=192, vocab=49152, heads=9),
        gemma3_270m=dict(d=640, layers=18, ffn=2048, q=1024, kv=256, vocab=262144, heads=4),
    )[name]
    return ModelShape.dense(name, qtype=qtype, **d)


# ----------------------------------------------------------------------------------------------------- NPU calls


@dataclass(frozen=True)
class Geometry:
    """How one weight runs on the NPU: what the planner builds (see npulm.npu.plan_geometry for npulm's)."""

    dtype: str  # "fp16" | "int8" | "int4" (the matmul's B element type)
    layout: str  # "native" | "norm" (A/C layout the runtime sees)
    chunk_k: int
    n_chunks: int
    n_slices: int  # cores the N dimension is split over
    rows_per_token: int  # NPU rows per token row (row-expanded pipelines, x halves, hi+lo rows)
    b_bytes: int  # NPU memory of B incl. padding
    n_pad: int  # padded N
    k_pad: int  # K as written into A (padding and rotation included)
    max_rows: int = 1 << 30  # rows per invocation (scratch cap): more tokens make more invocations

    def calls(self, m: int) -> int:
        return self.invocations(m) * self.n_chunks * self.n_slices

    def serial_calls(self, m: int) -> int:
        return self.invocations(m) * self.n_chunks

    def invocations(self, m: int) -> int:
        return -(-m // self.max_rows)


@dataclass(frozen=True)
class HostCost:
    """Host (CPU) time around one NPU invocation of a linear, on the target's CPU: per_call + per_elem x (A values +
    C values)."""

    per_call: float
    per_elem: float


def _ops(c: dict[str, float], dtype: str, layout: str, chunk_k: int) -> float:
    if dtype == "fp16":
        base = c["ops_fp16_native"] if chunk_k < 4096 else (
            c["ops_fp16_native_k4096"] if chunk_k < 8192 else c["ops_fp16_native_k8192"])
        return base * (c["ops_fp16_norm_ratio"] if layout == "norm" else 1.0)
    return c[f"ops_{dtype}_{layout}"]


def npu_time(c: dict[str, float], g: Geometry, m: int, host: HostCost) -> float:
    """Seconds for m token rows through one weight on the NPU, host work included."""
    inv = g.invocations(m)
    rows = min(m, g.max_rows) * g.rows_per_token
    n_core = g.n_pad / g.n_slices
    bw = min(c["bw_core"], c["bw_total"] / g.n_slices)
    b_chunk = g.b_bytes / (g.n_chunks * g.n_slices)
    t_chunk = c["launch_s"] + rows * c["npu_row_s"] + max(b_chunk / bw, 2.0 * rows * g.chunk_k * n_core /
                                                          _ops(c, g.dtype, g.layout, g.chunk_k))
    elems = m * g.rows_per_token * (g.k_pad + g.n_chunks * g.n_pad)
    return inv * (g.n_chunks * t_chunk + host.per_call) + host.per_elem * elems


def simple_geometry(k: int, n: int, dtype: str, layout: str, n_cores: int, max_k: int = 8192,
                    rows_per_token: int = 1, k_pad: int | None = None) -> Geometry:
    """One call per core per K-chunk (<= max_k), N split over the cores: rk-llama.cpp's and RKLLM's scheme."""
    kp = k if k_pad is None else k_pad
    n_chunks = -(-kp // max_k)
    chunk = -(-kp // n_chunks)
    bpp = {"fp16": 2.0, "int8": 1.0, "int4": 0.5}[dtype]
    return Geometry(dtype, layout, chunk, n_chunks, n_cores, rows_per_token, int(bpp * kp * n), n, kp)


_SCRATCH_ROW_BYTES = 256 << 20  # pipelines.SCRATCH_ROW_BYTES
_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # planner.BUCKETS


def _max_rows(c_bytes_per_row: int) -> int:
    ok = [b for b in _BUCKETS if b * c_bytes_per_row <= _SCRATCH_ROW_BYTES]
    return ok[-1] if ok else 1


def npulm_geometry(pipeline: str, k: int, n: int, qtype: str, chip) -> Geometry:
    """What npulm's planner builds for a weight under a pipeline (npulm.npu.pipelines), without building it.
    INT4xINT4 chunk widths depend on the weights (INT16-safe chunks): estimated here from typical per-channel
    int4 codes (mean |code| ~2.5), checked against the real planner in the tests."""
    from . import layout as L
    from . import pipelines as P
    from . import quant as qm
    from .planner import ceil_to, equal_chunks, split_n
    from .rknn import INT4_MM_INT4_TO_INT16, MATMUL_TYPES

    name = P.resolve(pipeline, Q[qtype], chip)
    spec = P.pipeline_spec(name)
    n_cores = chip.n_cores if chip.core_masks else 1
    rows, b_rows, chunk_k = 1, n, None
    if spec.weights == "fp16":
        t = P.FLOAT16_MM_FLOAT16_TO_FLOAT32
        kk = k
        chunk_k, _ = equal_chunks(kk, chip.max_k, chip.padded_align(t)[0])
        c_bytes = 4
    else:
        kk = qm.next_pow2(k) if spec.rotation == "pad" else k
        real = spec.realize(chip)
        t = real.mm_type
        k_al = chip.padded_align(t)[0]
        if t == INT4_MM_INT4_TO_INT16:
            a_max = 8 if real.a_split else qm.qmax(spec.act_bits)
            cap = max(k_al, int(32767 // (a_max * (2.5 if "channel" in spec.weights else 3.5))))
            chunk_k, _ = equal_chunks(kk, min(cap, chip.max_k), k_al)
        else:
            chunk_k, _ = equal_chunks(kk, chip.max_k, k_al)
        rows = real.rows_per_token
        if real.b_split:
            b_rows = 2 * n
        c_bytes = 4 if t != INT4_MM_INT4_TO_INT16 else 2
    _, b_dt, _ = MATMUL_TYPES[t]
    n_al = chip.padded_align(t)[1]
    n_chunks = -(-kk // chunk_k)
    slices = split_n(b_rows, n_cores, n_al)
    _, sn, sk, _ = chip.tiles(t)
    b_bytes = sum(n_chunks * ceil_to(L.nbytes(b_dt, L.b_native_count(chunk_k, e - s, sn, sk, chip.b_split_k)), 64)
                  for s, e in slices)
    n_pad = slices[-1][1]
    dtype = {"fp16": "fp16", "int8": "int8", "int4": "int4"}[b_dt]
    return Geometry(dtype, "native", chunk_k, n_chunks, len(slices), rows, b_bytes, n_pad, n_chunks * chunk_k,
                    _max_rows(c_bytes * n_chunks * n_pad * rows))


# ----------------------------------------------------------------------------------------------------- CPU side


def cpu_ops(c: dict[str, float], qtype: str) -> float:
    base = c["cpu_ops_q8_0"]
    if qtype in ("F16", "BF16", "F32"):
        return base * c["cpu_ops_f16_ratio"]
    if qtype == "Q4_0":
        return base * c["cpu_ops_q4_0_ratio"]
    return base


def cpu_linear_time(c: dict[str, float], li: LinearShape, m: int) -> float:
    """llama.cpp on the CPU: M=1 streams the weight, M>1 is compute-bound (whichever is slower)."""
    return max(li.k * li.n * type_bytes(li.qtype) / c["cpu_bw"], 2.0 * m * li.k * li.n / cpu_ops(c, li.qtype))


def attention_time(c: dict[str, float], shape: ModelShape, n_tokens: int) -> float:
    """Prefill attention of n_tokens on the CPU (llama-bench without -fa: full n x n scores, QK and PV)."""
    return shape.n_layer * 4.0 * n_tokens * n_tokens * shape.q_dim / c["cpu_attn_ops"]


# F32 values each token's activations are read + written per layer by llama.cpp's non-matmul ops in prefill (the
# llama graph without flash attention, SwiGLU fused), counted from the graph: per d: 2 RMS norms and their weight
# multiplies (8), 2 residual adds (6), src1 conversions of the q/k/v, gate/up matmuls (~5 x 1.25), the o and down
# outputs (2); per q: q output, RoPE (2), Q to F16 for KQ (1.5), KQV output, permute + cont (2), its conversion
# for attn_output (1.25); per kv: k, v outputs (2), RoPE on k (2), the F16 cache copies (3); per ffn: gate/up
# outputs (2), SwiGLU (3), the conversion for down (1.25); per attention score (n_kv x heads): KQ output (1),
# masked softmax read + write (2), the F16 conversion for KQV (1.5).
PREFILL_PASSES = {"d": 22.25, "q": 8.75, "kv": 7.0, "ffn": 6.25, "scores": 4.5}


def prefill_layer_bytes(shape: ModelShape, n_tokens: int) -> float:
    """Bytes per token and layer of the non-matmul activation passes in a prefill of n_tokens (n_kv = n_tokens)."""
    d, q, kv, ffn = shape.dims()
    p = PREFILL_PASSES
    return 4.0 * (p["d"] * d + p["q"] * q + p["kv"] * kv + p["ffn"] * ffn + p["scores"] * n_tokens * shape.heads)


def prefill_cpu_time(c: dict[str, float], shape: ModelShape, n_tokens: int) -> float:
    """The CPU's share of a prefill of n_tokens besides the matmuls, whatever runs the matmuls: attention (QK, PV)
    and the activation passes of the other ops. At prefill these stream from DRAM (a 512-token activation is
    0.6-18 MB, over the A76's 512 KB L2 and the 3 MB L3), at cpu_bw."""
    return attention_time(c, shape, n_tokens) + \
        shape.n_layer * n_tokens * prefill_layer_bytes(shape, n_tokens) / c["cpu_bw"]


# ----------------------------------------------------------------------------------------------------- placements


@dataclass(frozen=True)
class Impl:
    """A way to run a model: which linears go to the NPU with what geometry and host cost (None: the CPU)."""

    name: str
    geometry: object = None  # callable(LinearShape, c) -> Geometry | None (None: CPU)
    host: object = None  # callable(c, Geometry) -> HostCost
    output_on_npu: bool = False
    min_m: int = 1  # below this M the linear runs on the CPU (per-phase placement)
    layer_key: str = "cpu_layer_s"  # the constant for the non-matmul work per layer and token at decode


def _cpu_impl() -> Impl:
    return Impl("llama.cpp CPU")


def token_times(c: dict[str, float], shape: ModelShape, impl: Impl, m: int) -> tuple[float, float]:
    """(seconds of the block linears, seconds of the output matmul) for one forward of m tokens."""
    t = 0.0
    for li in shape.linears:
        g = impl.geometry(li, c) if impl.geometry is not None and m >= impl.min_m else None
        runs, mm = (li.count, m) if not li.experts else li.expert_runs(m)  # experts: priced at their real M
        if li.experts:
            runs *= li.count // li.experts
        t += runs * (cpu_linear_time(c, li, mm) if g is None else npu_time(c, g, mm, impl.host(c, g)))
    out = shape.output
    og = impl.geometry(out, c) if impl.output_on_npu and impl.geometry is not None else None
    t_out = cpu_linear_time(c, out, 1) if og is None else npu_time(c, og, 1, impl.host(c, og))
    return t, t_out


def tg_tok_s(c: dict[str, float], shape: ModelShape, impl: Impl) -> float:
    t, t_out = token_times(c, shape, impl, 1)
    return 1.0 / (t + t_out + shape.n_layer * c[impl.layer_key])


def pp_tok_s(c: dict[str, float], shape: ModelShape, impl: Impl, n: int = 512) -> float:
    """Prompt tokens per second for one batch of n (llama-bench pp: logits of the last token only)."""
    t, t_out = token_times(c, shape, impl, n)
    return n / (t + t_out + prefill_cpu_time(c, shape, n))


# --- published implementations (the rows to fit and to check)

def _ggml_host(c, g):  # rk-llama.cpp-style backends: quantize A / dequantize C in the backend, per element
    return HostCost(c["runtime_call_s"], c["ggml_host_elem_s"])


_RK_TYPE = {"F16": "fp16", "Q8_0": "int8", "Q4_0": "int4"}


def _rk_geometry(li: LinearShape, c) -> Geometry | None:
    """invisiofficial/rk-llama.cpp: F16 -> W16A16, Q8_0 -> W8A8, Q4_0 -> W4A4 (pad-to-2^n Hadamard); native B,
    normal A/C; N split over the cores, K-chunks <= 8192."""
    dt = _RK_TYPE.get(li.qtype)
    if dt is None:
        return None
    kp = 1 << (li.k - 1).bit_length() if dt == "int4" else li.k
    return simple_geometry(li.k, li.n, dt, "norm", int(c["npu_cores"]), k_pad=kp)


def _rkllm_geometry(li: LinearShape, c) -> Geometry:
    return simple_geometry(li.k, li.n, "int8", "native", int(c["npu_cores"]))


def _unimatrix_geometry(li: LinearShape, c) -> Geometry:
    return simple_geometry(li.k, li.n, "int8", "native", int(c["npu_cores"]))


IMPLS = {
    "cpu": _cpu_impl(),
    "rk-llama.cpp": Impl("rk-llama.cpp NPU", _rk_geometry, _ggml_host),
    "rkllm": Impl("RKLLM w8a8", _rkllm_geometry, lambda c, g: HostCost(0.0, 0.0), output_on_npu=True,
                  layer_key="rkllm_layer_s"),
    "unimatrix": Impl("unimatrix rk-llama.cpp W8A8 native", _unimatrix_geometry,
                      lambda c, g: HostCost(c["launch_s"], c["ggml_host_elem_s"])),
}


@dataclass(frozen=True)
class Row:
    """A published measurement: what the model must predict."""

    source: str
    chip: str
    model: str  # published_shape name
    qtype: str
    impl: str  # IMPLS key
    metric: str  # "pp512" | "pp128" | "tg"
    value: float
    fits: str | None = None  # the constant this row determines (fit rows only)

    def shape(self) -> ModelShape:
        return published_shape(self.model, self.qtype)

    def label(self) -> str:
        return f"{self.model} {self.qtype} {IMPLS[self.impl].name} {self.metric}"


def _mojo_int8(c, m):
    g = Geometry("int8", "norm", 2048, 1, 3, 1, 2048 * 768, 768, 2048)
    return npu_time(c, g, m, HostCost(c["runtime_call_s"], 0.0))


def _mojo_int4(c, m):
    g = Geometry("int4", "norm", 2048, 1, 3, 1, 2048 * 768 // 2, 768, 2048)
    return npu_time(c, g, m, HostCost(c["runtime_call_s"], 0.0))


RKL, RKLLM, UNI = "rk-llama.cpp README @39bb8e9", "RKLLM benchmark.md v1.3.0", "unimatrix rk-llama.cpp"
# micro-benchmark rows: (constant, chip, seconds function of the constants, published seconds, source)
MICRO_FITS = [
    ("runtime_call_s", "rk3588", lambda c: _mojo_int8(c, 1), 0.163e-3, "Mojo24x7 BENCHMARKS.md 6 INT8 M=1"),
    ("ops_int8_norm", "rk3588", lambda c: _mojo_int8(c, 1024), 2.061e-3, "Mojo24x7 BENCHMARKS.md 6 INT8 M=1024"),
    ("ops_int4_norm", "rk3588", lambda c: _mojo_int4(c, 1024), 26.712e-3, "Mojo24x7 BENCHMARKS.md 6 INT4 M=1024"),
]
FIT_ROWS = [
    Row(RKL, "rk3588", "ministral3_3b", "Q8_0", "cpu", "tg", 6.1, fits="cpu_layer_s"),
    Row(RKL, "rk3588", "ministral3_3b", "Q8_0", "cpu", "pp512", 17.5, fits="cpu_ops_q8_0"),
    Row(RKL, "rk3588", "ministral3_3b", "Q8_0", "rk-llama.cpp", "pp512", 120.9, fits="ggml_host_elem_s"),
    Row(RKLLM, "rk3588", "qwen3_0_6b", "Q8_0", "rkllm", "tg", 32.91, fits="rkllm_layer_s"),
    Row(RKLLM + " RK3576", "rk3576", "tinyllama_1_1b", "Q8_0", "rkllm", "tg", 12.18, fits="bw_total"),
]
HELD_OUT = [
    *[Row(RKL, "rk3588", m, q, impl, metric, v)
      for m, rows in (("gemma3_1b", {"F16": (68.5, 11.1, 249.6, 10.8), "Q8_0": (73.3, 19.5, 378.6, 16.5),
                                     "Q4_0": (164.7, 28.3, 51.4, 16.7)}),
                      ("granite4_350m", {"F16": (154.1, 25.8, 432.3, 20.2), "Q8_0": (163.4, 40.6, None, None),
                                         "Q4_0": (340.4, 55.2, None, None)}))
      for q, vals in rows.items()
      for impl, metric, v in zip(("cpu", "cpu", "rk-llama.cpp", "rk-llama.cpp"), ("pp512", "tg", "pp512", "tg"), vals)
      if v is not None],
    Row(RKL, "rk3588", "ministral3_3b", "Q4_0", "cpu", "pp512", 15.1),
    Row(RKL, "rk3588", "ministral3_3b", "Q4_0", "cpu", "tg", 8.3),
    Row(RKL, "rk3588", "ministral3_3b", "Q8_0", "rk-llama.cpp", "tg", 6.9),
    Row(RKLLM, "rk3588", "qwen2_0_5b", "Q8_0", "rkllm", "tg", 41.58),
    Row(RKLLM, "rk3588", "tinyllama_1_1b", "Q8_0", "rkllm", "tg", 24.43),
    Row(RKLLM, "rk3588", "qwen2_5_1_5b", "Q8_0", "rkllm", "tg", 16.69),
    Row(UNI, "rk3588", "qwen2_5_1_5b", "Q8_0", "unimatrix", "pp128", 280.8),
    Row(UNI, "rk3588", "qwen2_5_1_5b", "Q8_0", "unimatrix", "tg", 13.5),
    Row(RKLLM + " RK3576", "rk3576", "qwen2_0_5b", "Q8_0", "rkllm", "tg", 21.73),
]


def predict(c: dict[str, float], row: Row) -> float:
    impl, shape = IMPLS[row.impl], row.shape()
    if row.metric == "tg":
        return tg_tok_s(c, shape, impl)
    return pp_tok_s(c, shape, impl, int(row.metric[2:]))


def _solve(fn, lo: float, hi: float, target: float) -> float:
    """x in [lo, hi] (log-bisection) with fn(x) = target, fn monotonic."""
    f_lo = fn(lo) - target
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        f = fn(mid) - target
        if (f < 0) == (f_lo < 0):
            lo, f_lo = mid, f
        else:
            hi = mid
    return math.sqrt(lo * hi)


_BOUNDS = {"runtime_call_s": (1e-7, 1e-3), "ops_int8_norm": (1e9, 1e14), "ops_int4_norm": (1e8, 1e14),
           "cpu_layer_s": (1e-7, 1e-2), "cpu_ops_q8_0": (1e9, 1e13), "ggml_host_elem_s": (1e-13, 1e-7),
           "rkllm_layer_s": (1e-8, 1e-2), "bw_total": (1e9, 1e11)}


def fit(chip: str) -> dict[str, float]:
    """The chip's constants with every "fit:" constant solved from its row. The fits are coupled (a decode row
    also sees the prefill rate), so the solves are repeated until they settle."""
    c = {k: v.value for k, v in CONSTANTS[chip].items()}
    micro = [f for f in MICRO_FITS if f[1] == chip]
    rows = [r for r in FIT_ROWS if r.chip == chip]
    for name in [f[0] for f in micro] + [r.fits for r in rows]:
        c[name] = math.sqrt(_BOUNDS[name][0] * _BOUNDS[name][1])
    attn_fitted = CONSTANTS[chip]["cpu_attn_ops"].value is None
    for _ in range(6):
        if c.get("ops_fp16_norm_ratio") is None or CONSTANTS[chip]["ops_fp16_norm_ratio"].value is None:
            c["ops_fp16_norm_ratio"] = c["ops_int8_norm"] / c["ops_int8_native"]
        if attn_fitted:
            c["cpu_attn_ops"] = c["cpu_ops_q8_0"]
        for name, _, fn, target, _ in micro:
            c[name] = _solve(lambda x, n=name, f=fn: f({**c, n: x}), *_BOUNDS[name], target)
        for row in rows:
            c[row.fits] = _solve(lambda x, r=row: predict({**c, r.fits: x}, r), *_BOUNDS[row.fits], row.value)
    missing = [k for k, v in c.items() if v is None]
    if missing:
        raise ValueError(f"{chip}: constants without a value or a fit row: {missing}")
    return c


_CACHE: dict[tuple, dict[str, float]] = {}


def constants(chip: str = "rk3588", profile: str | None = None) -> dict[str, float]:
    """The cost constants of a chip: published (fitted) values, overridden by a board profile when given (or named
    by $NPULM_COST_PROFILE)."""
    chip = chip.lower()
    if chip not in CONSTANTS:
        raise ValueError(f"no cost model for chip {chip!r}; known: {', '.join(CONSTANTS)}")
    profile = profile or os.environ.get("NPULM_COST_PROFILE") or None
    key = (chip, profile, os.path.getmtime(profile) if profile else None)
    if key not in _CACHE:
        c = fit(chip)
        if profile:
            with open(profile) as f:
                data = json.load(f)
            if data.get("chip", chip) != chip:
                raise ValueError(f"cost profile {profile} is for {data.get('chip')}, not {chip}")
            unknown = set(data.get("constants", {})) - set(c)
            if unknown:
                raise ValueError(f"cost profile {profile}: unknown constants {sorted(unknown)}")
            c.update({k: float(v) for k, v in data.get("constants", {}).items()})
        _CACHE[key] = c
    return _CACHE[key]


def validation_table() -> str:
    """Markdown: fitted rows (reproduced) and held-out rows (predicted / published)."""
    lines = ["| | row | source | published | predicted | predicted / published |", "|---|---|---|---|---|---|"]
    for kind, rows in (("fit", FIT_ROWS), ("held out", HELD_OUT)):
        for r in rows:
            p = predict(constants(r.chip), r)
            lines.append(f"| {kind} | {r.chip} {r.label()} | {r.source} | {r.value:g} | {p:.1f} | "
                         f"{p / r.value:.2f} |")
    return "\n".join(lines)


def constants_table(chip: str = "rk3588") -> str:
    c = constants(chip)
    lines = ["| constant | value | unit | source |", "|---|---|---|---|"]
    for k, v in CONSTANTS[chip].items():
        lines.append(f"| {k} | {c[k]:.4g} | {v.unit} | {v.source} |")
    return "\n".join(lines)


def held_out_errors() -> list[tuple[Row, float]]:
    return [(r, predict(constants(r.chip), r) / r.value) for r in HELD_OUT]



def report() -> str:
    """docs/cost-model.md: the constants and the fitted / held-out rows."""
    ok = sum(0.75 <= x <= 1.25 for _, x in held_out_errors())
    return "\n".join([
        "# RK3588 / RK3576 cost model", "",
        "Generated by `python -m npulm.npu.cost > docs/cost-model.md` from `npulm/npu/cost.py`. The constants "
        "marked \"fit:\" are solved from one published row each; every other row below was held out of the fit "
        f"and is predicted: {ok} of {len(HELD_OUT)} held-out rows within ±25 %. [I] marks an inference where no "
        "published figure exists (RK3576 mostly).", "",
        "Model: an NPU call = launch + rows x npu_row_s + max(B bytes / per-core bandwidth, MACs / per-core "
        "throughput(type, layout, chunk K)); per-core chains of K-chunks run in parallel; host work per call = "
        "per_call + per_elem x (A + C values); CPU decode = bytes / cpu_bw + per-layer work, CPU prefill = matmul "
        "ops / cpu_ops(type) + attention (full n x n scores, llama-bench without -fa) / cpu_attn_ops + the other "
        "ops' activation passes (`PREFILL_PASSES`, counted from llama.cpp's graph) / cpu_bw, whatever runs the "
        "matmuls.", "",
        "## Constants (rk3588)", "", constants_table("rk3588"), "",
        "## Constants (rk3576)", "", constants_table("rk3576"), "",
        "## Published rows: fitted, and held out (predicted / published)", "", validation_table(), ""])


if __name__ == "__main__":  # python -m npulm.npu.cost > docs/cost-model.md
    print(report())
