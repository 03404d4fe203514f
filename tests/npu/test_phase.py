"""Per-phase placement: a weight on the NPU from M token rows up and on the CPU path below, from one load; and
`-ngl auto` (the cost model's plan)."""

from __future__ import annotations

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
