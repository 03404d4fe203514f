"""The added families (qwen3, qwen3moe, olmoe, Mixtral-style llama) against llama.cpp on random-weight GGUFs with
the real tensor names, and the mixture of experts against itself: prefill equals token-by-token, experts on the
emulated NPU equal the CPU path within the pipeline's bound."""

from __future__ import annotations

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf_writers import write_tiny_model

from npulm.evaluate import divergence
from npulm.gguf import GGUFFile
from npulm.linear import Weight
from npulm.models import load_model
from npulm.models.moe import MoE
from npulm.placement import Placement, parse_overrides

N_POS = 256
# name -> (architecture, experts, experts used, kv heads); OLMoE's q/k norms span all heads: no grouped-query attention
FAMILIES = {
    "qwen3": ("qwen3", 0, 0, 2),
    "qwen3moe": ("qwen3moe", 8, 2, 2),
    "olmoe": ("olmoe", 8, 2, 4),
    "mixtral": ("llama", 4, 2, 2),
}
# (KL bound, top-1 bound) per weight type: float as llama.cpp, quantized as the foundation's thresholds
THRESHOLDS = {T.F32: (1e-3, 0.99), T.F16: (1e-3, 0.99), T.Q8_0: (0.01, 0.95), T.Q4_0: (0.01, 0.95)}


def family_model(path, name: str, qtype: T = T.F32, n_ctx: int = N_POS):
    """Untied output and weights of scale 0.12: at the conftest's 0.15 these random nets amplify llama.cpp's own
    8-bit activation rounding so much (its float-activation twin differs from it by KL 8e-3, top-1 94.9 % on
    qwen3moe Q8_0) that no implementation meets the quantized thresholds; smaller scales or a tied output make
    the top token the input token (a test that cannot fail)."""
    arch, n_expert, n_used, n_head_kv = FAMILIES[name]
    return write_tiny_model(path / f"{name}-{qtype.name}.gguf", arch, qtype, n_ctx=n_ctx, n_head_kv=n_head_kv,
                            tied=False, n_expert=n_expert, n_expert_used=n_used, weight_scale=0.12,
                            output_scale=0.12)


def random_tokens(n: int, seed: int = 0) -> list[int]:
    return [1] + np.random.default_rng(seed).integers(5, 297, n - 1).tolist()


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", list(THRESHOLDS), ids=lambda t: t.name)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_llama_cpp(tmp_path, name, qtype):
    pytest.importorskip("llama_cpp")
    from npulm.api import Llama
    from npulm.reference import LlamaCpp

    path = family_model(tmp_path, name, qtype)
    tokens = random_tokens(N_POS)
    ref = LlamaCpp(str(path), n_ctx=N_POS).logits(tokens)
    ours = Llama(str(path), n_ctx=N_POS, verbose=False)
    got = ours.session.eval(tokens, logits_from=0)
    d = divergence(ref, got)
    kl, top1 = THRESHOLDS[qtype]
    print(f"\n{name} {qtype.name}: mean KL {d.mean_kl:.2e}, top-1 {100 * d.top1_rate:.1f} %")
    assert d.mean_kl <= kl and d.top1_rate >= top1


@pytest.mark.parametrize("name", ["qwen3moe", "olmoe"])
def test_moe_prefill_equals_token_by_token(tmp_path, name):
    g = GGUFFile(family_model(tmp_path, name, n_ctx=32))
    tokens = random_tokens(20, seed=1)
    model = load_model(g, 32)
    batched = model.forward(tokens, model.make_cache(), logits_from=0)
    cache = model.make_cache()
    stepwise = np.concatenate([model.forward([t], cache) for t in tokens])
    np.testing.assert_allclose(stepwise, batched, rtol=0, atol=1e-4 * np.abs(batched).max())


def test_moe_groups_tokens_per_expert(tmp_path):
    """Each selected expert runs one call over all the tokens that chose it; the result equals the per-token sum."""
    g = GGUFFile(family_model(tmp_path, "qwen3moe", n_ctx=32))
    model = load_model(g, 32, Placement(default="cpu-ref"))
    moe: MoE = model.blocks[0].moe
    x = np.random.default_rng(2).standard_normal((24, 64)).astype(np.float32)
    calls: list[int] = []
    up = moe.up

    def counting(lin):
        return lambda a: calls.append(len(a)) or lin(a)

    moe.up = [counting(lin) for lin in up]
    got = moe(x)
    chosen, weights = moe.route(x)
    assert sorted(calls) == sorted(np.bincount(chosen.ravel())[np.unique(chosen)].tolist())
    assert sum(calls) == 24 * moe.n_used
    want = np.zeros_like(got)
    for t in range(24):
        for e, p in zip(chosen[t], weights[t]):
            h = x[t:t + 1].astype(np.float64)
            gate, u = h @ moe.gate[e].w.T, h @ up[e].w.T
            want[t] += p * ((gate / (1 + np.exp(-gate)) * u) @ moe.down[e].w.T)[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_expert_weights_are_views_of_the_file(tmp_path):
    g = GGUFFile(family_model(tmp_path, "qwen3moe", T.Q8_0, n_ctx=32))
    experts = Weight.experts_from_gguf(g, "blk.1.ffn_down_exps.weight")
    assert len(experts) == 8 and (experts[0].n_out, experts[0].n_in) == (64, 128)
    raw = g.raw("blk.1.ffn_down_exps.weight")
    assert all(np.shares_memory(w.data, raw) for w in experts)
    np.testing.assert_array_equal(experts[3].dequantize(), g.dequantize("blk.1.ffn_down_exps.weight")[3])


@pytest.mark.parametrize("qtype, pipeline", [(T.F16, "W16A16"), (T.Q8_0, "W8A16_HADAMARD"),
                                             (T.Q4_0, "W8A16_CHANNEL")])
def test_experts_on_the_npu_equal_the_cpu_path(tmp_path, qtype, pipeline):
    """Experts on the emulated NPU, router and the rest on the CPU: the MoE output differs from the float path by
    less than the pipeline's stated per-matmul bound (tests/npu/test_pipelines.py)."""
    from npu.test_pipelines import BOUNDS

    g = GGUFFile(family_model(tmp_path, "qwen3moe", qtype, n_ctx=32))
    on_npu = load_model(g, 32, Placement(default="cpu-ref", overrides=[("*_exps*", pipeline)]))
    on_cpu = load_model(g, 32, Placement(default="cpu-ref"))
    assert {lin.runs_on for lin in on_npu.blocks[0].moe.gate} == {f"npu:{pipeline}"}
    x = np.random.default_rng(3).standard_normal((16, 64)).astype(np.float32)
    for a, b in zip(on_npu.blocks, on_cpu.blocks):
        got, want = a.moe(x), b.moe(x)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < BOUNDS[pipeline]
    tokens = random_tokens(16, seed=4)
    d = divergence(on_cpu.forward(tokens, on_cpu.make_cache(), logits_from=0),
                   on_npu.forward(tokens, on_npu.make_cache(), logits_from=0))
    assert d.top1_rate >= 0.9


def test_cpu_moe_override_keeps_experts_on_the_cpu(tmp_path, npu_predicted_fast):
    g = GGUFFile(family_model(tmp_path, "qwen3moe", T.Q8_0, n_ctx=32))
    placement = Placement(n_layer=2, npu_layers="all", overrides=parse_overrides(["blk.*.ffn_*_exps.*=cpu"]))
    model = load_model(g, 32, placement)
    block = model.blocks[0]
    assert all(lin.requested == "cpu" for lin in block.moe.gate + block.moe.up + block.moe.down)
    assert block.wq.runs_on.startswith("npu:") and block.moe.router.requested == "cpu"


def test_cost_model_prices_experts_at_their_real_m(tmp_path):
    """A MoE's expert matrices: in the shape with all their parameters, at decode only the chosen ones run (M = 1),
    at prefill every expert runs once with M = its share of the tokens."""
    from npulm.npu import cost as C

    shape = C.ModelShape.from_gguf(family_model(tmp_path, "qwen3moe", T.Q8_0, n_ctx=32))
    up = next(li for li in shape.linears if li.role == "ffn_up_exps")
    assert (up.k, up.n, up.count, up.experts, up.used) == (64, 128, 2 * 8, 8, 2)
    assert up.expert_runs(1) == (pytest.approx(2.0), 1)
    active, m = up.expert_runs(512)
    assert active == pytest.approx(8.0) and m == 128
    c, cpu = C.constants("rk3588"), C.IMPLS["llama.cpp CPU"] if "llama.cpp CPU" in C.IMPLS else C._cpu_impl()
    t1, _ = C.token_times(c, shape, cpu, 1)
    dense = C.ModelShape(shape.name, shape.n_layer, tuple(
        C.LinearShape(li.role, li.k, li.n, li.qtype, li.count) for li in shape.linears), shape.output, shape.q_dim)
    assert t1 < C.token_times(c, dense, cpu, 1)[0]  # decode pays for 2 of 8 experts, not all 8


def test_info_placement_shows_experts_once_with_their_split(tmp_path, npu_predicted_fast, capsys):
    from npulm.cli import main

    path = family_model(tmp_path, "qwen3moe", T.Q8_0, n_ctx=32)
    assert main(["info", str(path), "--placement", "-ngl", "all", "-ot", "blk.1.ffn_*_exps.*=cpu"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("  blk.")]
    rows = {cells[0]: cells[1:] for cells in lines}
    assert len(lines) == len(rows)  # one row per tensor: the 8 experts of a 3-D tensor together
    assert rows["blk.0.ffn_up_exps.weight"][:4] == ["Q8_0", "128x64", "x", "8"]
    split = " ".join(rows["blk.0.ffn_up_exps.weight"][6:])
    assert "core" in split and "K-chunk" in split and "runs/call" in split
    assert rows["blk.1.ffn_up_exps.weight"][4:] == ["cpu", "cpu:a8"] and rows["blk.0.ffn_gate_inp.weight"][2] == "cpu"
