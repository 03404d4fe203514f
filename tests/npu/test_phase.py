"""Per-phase placement: a weight on the NPU from M token rows up and on the CPU path below, from one load; and
`-ngl auto` (the cost model's plan)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from npulm import Llama
from npulm.gguf import GGUFFile
from npulm.linear import Weight
from npulm.npu.device import NpuDevice
from npulm.npu.emulator import EmulatorRuntime
from npulm.placement import make_linear


@pytest.fixture
def dev() -> NpuDevice:
    return NpuDevice(runtime=EmulatorRuntime("rk3588"))


def test_cpu_below_the_threshold_npu_from_it(tiny_models, dev):
    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    lin = make_linear(w, "npu:W8A8_CHANNEL@4", dev)
    npu, cpu = make_linear(w, "npu:W8A8_CHANNEL", dev), make_linear(w, "cpu")
    assert lin.requested == lin.runs_on == "npu:W8A8_CHANNEL@4" and lin.on_npu and lin.min_m == 4
    rng = np.random.default_rng(0)
    for m in (1, 3):
        x = rng.standard_normal((m, w.n_in)).astype(np.float32)
        assert np.array_equal(lin(x), cpu(x))  # the CPU path, exactly
    x = rng.standard_normal((6, w.n_in)).astype(np.float32)
    assert np.array_equal(lin(x), npu(x)) and not np.array_equal(lin(x), cpu(x))


def test_bad_threshold_is_a_clear_error(tiny_models, dev):
    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    with pytest.raises(ValueError, match="after '@'"):
        make_linear(w, "npu:W8A8_CHANNEL@x", dev)


def test_ngl_auto_places_by_the_plan(tiny_models, monkeypatch):
    from npulm import plan

    path = str(tiny_models["llama-q4_0"])
    # the tiny model: the NPU's launch cost loses to the CPU at every size, so the plan keeps everything on the CPU
    llm = Llama(path, n_ctx=32, verbose=False, n_npu_layers="auto")
    assert all(lin.runs_on.startswith("cpu") for lin in llm.model.linears)
    ref = Llama(path, n_ctx=32, verbose=False)
    toks = llm.tokenize(b"Hello world")
    assert np.array_equal(llm.session.eval(toks), ref.session.eval(toks))
    # a plan that does place a weight: its spec carries the threshold
    monkeypatch.setattr(plan, "auto_specs", lambda p, chip, **kw: {"blk.1.ffn_up.weight": "npu:W16A16@8"})
    llm = Llama(path, n_ctx=32, verbose=False, n_npu_layers="auto")
    specs = {lin.name: lin.requested for lin in llm.model.linears}
    assert specs["blk.1.ffn_up.weight"] == "npu:W16A16@8" and specs["blk.0.ffn_up.weight"] == "cpu"
    out = llm.session.eval(toks[:3])  # 3 rows < 8: every linear on the CPU path
    ref.reset()
    assert np.array_equal(out, ref.session.eval(toks[:3]))


class _OddTiles(EmulatorRuntime):
    """A runtime whose native sizes differ from npulm's tile table (as a board with other tiles would)."""

    part = "B"

    def create(self, info):
        ctx, io = super().create(info)
        getattr(io, self.part).size += 64
        return ctx, io


@pytest.mark.parametrize("part", ["B", "A", "C"])
def test_native_size_mismatch_falls_back_to_the_cpu(tiny_models, part):
    import warnings

    rt = _OddTiles("rk3588")
    rt.part = part
    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lin = make_linear(w, "npu:W8A8_CHANNEL", NpuDevice(runtime=rt))
    assert not lin.on_npu and "refused" in lin.refused and lin.runs_on.startswith("cpu")
    assert any("sizes" in str(r.message) or "native B" in str(r.message) for r in record)
    x = np.random.default_rng(0).standard_normal((2, w.n_in)).astype(np.float32)
    assert np.array_equal(lin(x), make_linear(w, "cpu")(x))


# ----------------------------------------------------------------------------------------------------- npu:auto


def _weights_of(shape_names: list[str], qtype: str) -> list[Weight]:
    """Weight descriptions (name, type, K, N) of published models' block linears: all auto_choice looks at."""
    from gguf.constants import GGMLQuantizationType as T

    from npulm.npu import cost as C

    out = []
    for name in shape_names:
        for li in C.published_shape(name, qtype).linears:
            out.append(Weight(f"blk.0.{li.role}.weight", T[li.qtype], li.n, li.k, b""))
    return out


@pytest.mark.parametrize("chip_name", ["rk3588", "rk3576"])
@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_auto_never_selects_a_predicted_slower_placement(chip_name, qtype):
    """Every weight of SmolLM2 / Gemma-3-270M / Qwen2.5-1.5B shapes, every batch size (decode M=1 to prefill 512):
    what `npu:auto` picks is never predicted slower than the CPU for that M, whichever pipeline it picks."""
    from npulm.npu import cost as C
    from npulm.npu.chips import get_chip
    from npulm.plan import BUCKETS, Planner, auto_choice, pipeline_names

    chip = get_chip(chip_name)
    picked = set()
    for w in _weights_of(["smollm2_135m", "gemma3_270m", "qwen2_5_1_5b"], qtype):
        ch = auto_choice(w, chip)
        li = C.LinearShape(w.name.split(".")[2], w.n_in, w.n_out, w.type.name)
        pl = Planner(C.ModelShape("w", 1, (li,), li, 1), chip)
        assert ch.pipeline is None or ch.pipeline in pipeline_names()
        for m in BUCKETS:
            assert pl.linear_time(li, ch, m) <= C.cpu_linear_time(pl.c, li, m) * (1 + 1e-9), (w.name, ch, m)
        if ch.pipeline is not None:
            picked.add((ch.pipeline, ch.min_m > 1))
            assert pl.linear_time(li, ch, 512) < C.cpu_linear_time(pl.c, li, 512)
    if chip_name == "rk3588":  # not vacuous: prefill goes to the NPU; decode (M=1) stays on the CPU for quantized
        assert picked, picked  # weights (they stream fewer bytes from the CPU than the NPU's 1-2 bytes per param)
        assert qtype == "F16" or all(later for _, later in picked), picked


def test_auto_on_tiny_weights_keeps_the_cpu(tiny_models):
    """With the published constants the NPU's fixed costs lose on the tiny test model at every M: auto is the CPU
    path (the same output as the CPU)."""
    dev = NpuDevice(runtime=EmulatorRuntime("rk3588"))
    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    lin = make_linear(w, "npu:auto", dev)
    assert lin.requested == "npu:auto" and lin.runs_on.startswith("cpu")
    x = np.random.default_rng(0).standard_normal((4, w.n_in)).astype(np.float32)
    assert np.array_equal(lin(x), make_linear(w, "cpu")(x))


@pytest.fixture
def npu_pays_from_a_batch(tmp_path, monkeypatch):
    """A board profile where the NPU streams weights at the CPU's bandwidth (slower at decode: 1-2 bytes per
    parameter against Q4_0's 0.56) but computes for free (faster from some batch size up)."""
    from npulm.npu import cost as C

    bw = C.constants("rk3588")["cpu_bw"]
    fast = {"launch_s": 0.0, "npu_row_s": 0.0, "bw_core": bw, "bw_total": bw, "ops_int8_native": 1e18,
            "ops_fp16_native": 1e18, "ops_fp16_native_k4096": 1e18, "ops_fp16_native_k8192": 1e18,
            "ops_int4_native": 1e18, "host_a76_factor": 1e-9}
    path = tmp_path / "board.json"
    path.write_text(json.dumps({"chip": "rk3588", "constants": fast}))
    monkeypatch.setenv("NPULM_COST_PROFILE", str(path))


def test_auto_per_phase_is_the_cpu_exactly_below_its_threshold(tiny_models, npu_pays_from_a_batch):
    """`-ngl all` without a pipeline = npu:auto per weight: decode (M=1) where the NPU is predicted slower runs the
    CPU path, bit for bit, and a batch from the threshold up runs the NPU, from one load."""
    path = str(tiny_models["llama-q4_0"])
    llm = Llama(path, n_ctx=32, verbose=False, n_npu_layers="all", chip="rk3588")
    npu = [lin for lin in llm.model.linears if lin.runs_on.startswith("npu")]
    assert npu and all(lin.requested == "npu:auto" and lin.min_m > 1 for lin in npu)
    ref = Llama(path, n_ctx=32, verbose=False)
    toks = llm.tokenize(b"Hello world, hello world, hello world")
    for t in toks[:3]:  # decode: one token per call, below every threshold
        assert np.array_equal(llm.session.eval([t]), ref.session.eval([t]))
    m0 = min(lin.min_m for lin in npu)
    assert m0 <= len(toks)
    llm.reset()
    ref.reset()
    assert not np.array_equal(llm.session.eval(toks[:m0]), ref.session.eval(toks[:m0]))  # a batch: the NPU
