"""The NPU Linear and placement: targets parsed once, a device (runtime, chip, memory) per model, fallback to the CPU
path (one warning, identical output, shown apart from the requested target), freeing NPU memory with the model, and
tiny models end to end on the emulator."""

from __future__ import annotations

import dataclasses
import gc
import warnings

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from npulm import Llama
from npulm.cli import main
from npulm.gguf import GGUFFile
from npulm.linear import Weight
from npulm.models import load_model
from npulm.npu import pipelines as P
from npulm.npu.chips import get_chip
from npulm.npu.device import NpuDevice, NpuFallbackWarning
from npulm.npu.emulator import EmulatorRuntime
from npulm.npu.rknn import RknnTimeout
from npulm.placement import MatmulSpec, Placement, make_linear, parse_overrides, parse_spec, table

# the NPU mechanics of auto-placed weights: under a profile where the NPU is predicted faster (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("npu_predicted_fast")


class FlakyRuntime(EmulatorRuntime):
    """The emulator, with rknn_matmul_run failing (as a timed-out NPU would) once `fail` is set."""

    fail = False

    def run(self, ctx: int) -> None:
        if self.fail:
            raise RknnTimeout(-2, "rknn_matmul_run", "injected")
        super().run(ctx)


def emulated(chip="rk3588", **options) -> NpuDevice:
    return NpuDevice(runtime=EmulatorRuntime(chip) if isinstance(chip, str) else EmulatorRuntime(chip), **options)


def weights(path, *names: str) -> list[Weight]:
    g = GGUFFile(path)
    return [Weight.from_gguf(g, n) for n in names]


def x_for(w: Weight, m: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((m, w.n_in)).astype(np.float32)


def fallback_warnings(record) -> list:
    return [r for r in record if issubclass(r.category, NpuFallbackWarning)]


def test_runtime_failure_falls_back_once_with_cpu_output(tiny_models):
    rt = FlakyRuntime("rk3588")
    dev = NpuDevice(runtime=rt)
    w1, w2 = weights(tiny_models["llama-q4_0"], "blk.0.attn_q.weight", "blk.1.ffn_down.weight")
    l1, l2 = make_linear(w1, "npu:W8A8_CHANNEL", dev), make_linear(w2, "npu:auto", dev)
    x1, x2 = x_for(w1), x_for(w2)
    assert l1.on_npu and l2.on_npu
    before = l1(x1)
    rt.fail = True
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        y1, y2 = l1(x1), l2(x2)
        l1(x1)
    assert len(fallback_warnings(record)) == 1
    assert "blk.0.attn_q.weight" in str(fallback_warnings(record)[0].message)
    assert "RKNN_ERR_TIMEOUT" in str(fallback_warnings(record)[0].message)
    assert np.array_equal(y1, make_linear(w1, "cpu")(x1)) and np.array_equal(y2, make_linear(w2, "cpu")(x2))
    assert not l1.on_npu and not np.array_equal(before, y1)  # it was the NPU path before
    assert dev.fallbacks == ["blk.0.attn_q.weight", "blk.1.ffn_down.weight"]
    # requested target and where it runs stay apart
    assert (l1.requested, l1.runs_on) == ("npu:W8A8_CHANNEL", "cpu:a8") and "RKNN_ERR_TIMEOUT" in l1.refused
    assert table([l1])[0] == ("blk.0.attn_q.weight", "Q4_0 64x64", "npu:W8A8_CHANNEL", "cpu:a8", "", l1.refused)


def test_chip_refusing_the_type_falls_back_at_load(tiny_models):
    fp16_only = dataclasses.replace(get_chip("rk3588"), name="rk3588-fp16only", matmul_types=frozenset({1}))
    dev = emulated(fp16_only)
    ws = weights(tiny_models["llama-q8_0"], "blk.0.attn_q.weight", "blk.0.attn_k.weight")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        lins = [make_linear(w, "npu:W8A8_HADAMARD", dev) for w in ws]
        fp16 = make_linear(ws[0], "npu:W16A16", dev)
    assert len(fallback_warnings(record)) == 1
    assert [lin.on_npu for lin in lins] == [False, False] and fp16.on_npu
    for lin, w in zip(lins, ws):
        assert np.array_equal(lin(x_for(w)), make_linear(w, "cpu")(x_for(w)))


def test_each_device_warns_once(tiny_models):
    fp16_only = dataclasses.replace(get_chip("rk3588"), name="rk3588-fp16only", matmul_types=frozenset({1}))
    (w,) = weights(tiny_models["llama-q8_0"], "blk.0.attn_q.weight")
    for _ in range(2):
        dev = emulated(fp16_only)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            make_linear(w, "npu:W8A8_CHANNEL", dev)
            make_linear(w, "npu:W8A8_CHANNEL", dev)
        assert len(fallback_warnings(record)) == 1 and len(dev.fallbacks) == 2


def test_unknown_pipeline_is_an_error(tiny_models):
    (w,) = weights(tiny_models["llama-q8_0"], "blk.0.attn_q.weight")
    with pytest.raises(ValueError, match="W8A16_HADAMARD"):
        make_linear(w, "npu:W5A5_NOPE", emulated())
    with pytest.raises(ValueError, match="needs an NPU device"):
        make_linear(w, "npu:auto")


def test_targets_parse_once_into_specs():
    assert parse_spec("cpu") == MatmulSpec("cpu") and str(parse_spec("CPU:A16")) == "cpu:a16"
    assert parse_spec("cpu-ref") == MatmulSpec("cpu-ref")
    assert parse_spec("npu:auto") == MatmulSpec("npu", "auto")
    assert parse_spec("w8a8_channel") == parse_spec("npu:W8A8_CHANNEL") == MatmulSpec("npu", "W8A8_CHANNEL")
    for bad, known in (("cpu:a4", "cpu:a16"), ("npu:W5A5", "W8A16_HADAMARD"), ("gpu", "cpu-ref")):
        with pytest.raises(ValueError, match=known):
            parse_spec(bad)
    with pytest.raises(ValueError, match="npu_layers"):
        Placement(npu_layers="some")
    with pytest.raises(ValueError, match="cpu:a4"):
        Placement(overrides=[("blk.*", "cpu:a4")])  # parsed at construction, not at the first weight


def test_device_says_which_runtime(capsys):
    dev = NpuDevice(chip="rk3576", runtime="emulator")
    assert dev.runtime.kind == "emulator" and dev.chip.name == "rk3576"
    err = capsys.readouterr().err
    assert "emulator" in err and "rk3576" in err and "not a board" in err


def test_runtime_and_chip_are_per_model(tiny_models):
    """A second model with another chip changes nothing for the first: its weights keep their runtime and chip."""
    path, tokens = str(tiny_models["llama-q4_0"]), list(range(5, 21))
    first = Llama(path, n_ctx=32, verbose=False, n_npu_layers="all", chip="rk3588")
    before = first.session.eval(tokens, logits_from=0)
    second = Llama(path, n_ctx=32, verbose=False, n_npu_layers="all", chip="rk3568")
    assert {lin.device for lin in first.model.linears} == {first.placement.npu}
    assert first.placement.npu.chip.name == "rk3588" and second.placement.npu.chip.name == "rk3568"
    assert first.placement.npu.arena is not second.placement.npu.arena
    assert {lin.runs_on for lin in first.model.linears} == {f"npu:{P.BEST_QUANTIZED}"}
    assert {lin.runs_on for lin in second.model.linears} == {f"npu:{P.BEST_QUANTIZED}"}
    first.reset()
    assert np.array_equal(first.session.eval(tokens, logits_from=0), before)


def test_chip_without_int4_runs_int4_recipes_on_int8(tiny_models):
    dev = emulated("rk3568")
    (w,) = weights(tiny_models["llama-q4_0"], "blk.0.ffn_up.weight")
    lin = make_linear(w, "npu:auto", dev)
    assert lin.on_npu and lin.pipeline == P.auto_pipeline(T.Q4_0, get_chip("rk3568")) == P.BEST_QUANTIZED
    forced = make_linear(w, "npu:W4A8_BLOCK", dev)  # int4 recipe, INT8xINT8 realization: same numbers
    halves = make_linear(w, "npu:W4A8_BLOCK", emulated())  # RK3588: two INT4xINT4 passes
    x = x_for(w)
    assert forced.on_npu and np.linalg.norm(forced(x) - halves(x)) < 1e-6 * np.linalg.norm(halves(x))


def test_placement_layers_and_overrides(tiny_models):
    path = tiny_models["llama-q4_0"]
    g = GGUFFile(path)
    w = {n: Weight.from_gguf(g, n) for n in ("blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight",
                                            "output.weight")}
    p = Placement(n_layer=2, npu_layers=1)
    assert [str(p.spec_for(w[n])) for n in w] == ["cpu", "npu:auto", "npu:auto", "cpu"]
    p = Placement(n_layer=2, npu_layers="all", pipeline="W4A4_CHANNEL",
                  overrides=parse_overrides(["blk.1.ffn_down.*=cpu", "blk.0.*=W8A8_HADAMARD"]))
    assert [str(p.spec_for(w[n])) for n in w] == ["npu:W8A8_HADAMARD", "npu:W4A4_CHANNEL", "cpu", "npu:W4A4_CHANNEL"]

    llm = Llama(str(path), n_ctx=32, verbose=False, n_npu_layers=1,
                tensor_overrides=["blk.1.ffn_down.weight=cpu-ref"])
    lins = {lin.name: lin for lin in llm.model.linears}
    assert lins["blk.0.attn_q.weight"].requested == "cpu" and lins["output.weight"].requested == "cpu"
    assert lins["blk.0.attn_q.weight"].runs_on == "cpu:a8" and lins["output.weight"].runs_on == "cpu:a16"
    assert lins["blk.1.ffn_down.weight"].runs_on == "cpu-ref"
    assert (lins["blk.1.attn_q.weight"].requested, lins["blk.1.attn_q.weight"].runs_on) == (
        "npu:auto", f"npu:{P.BEST_QUANTIZED}")


def test_info_shows_requested_and_actual_placement(tiny_models, capsys):
    path = str(tiny_models["llama-q4_0"])
    assert main(["info", path, "--placement", "-ngl", "1", "-ot", "output.weight=cpu-ref"]) == 0
    out = capsys.readouterr().out
    assert "placement: 7 of 15 matmuls on the NPU (emulator" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith("  blk.")}
    assert rows["blk.1.attn_q.weight"][2:4] == ["npu:auto", f"npu:{P.BEST_QUANTIZED}"]
    assert rows["blk.0.attn_q.weight"][2:] == ["cpu", "cpu:a8"]
    assert " ".join(rows["blk.1.attn_q.weight"][4:]).endswith("runs/call (<= 512 rows)")  # cores x K-chunks


def test_npu_memory_is_freed_with_the_model(tiny_models):
    rt = EmulatorRuntime("rk3588")
    base = rt.domain_usage(0)
    model = load_model(GGUFFile(tiny_models["llama-q8_0"]), 32,
                       Placement(n_layer=2, npu_layers="all", npu=NpuDevice(runtime=rt)))
    model.forward([1, 2, 3], model.make_cache())
    assert rt.domain_usage(0) > base and len(rt._ctxs) > 10
    del model
    gc.collect()
    assert rt.domain_usage(0) == base
    assert len(rt._ctxs) <= 1  # the arena's anchor context


# logits of the whole tiny model through each pipeline vs the float32 reference: relative error bounds
# (random weights and activations without outliers: rotations gain little here; real models are in docs/accuracy.md)
E2E = {"W16A16": 3e-3, "W8A8_CHANNEL": 0.06, "W8A16_CHANNEL": 0.04, "W8A16_HADAMARD": 0.04, "W4A8_BLOCK": 0.5,
       "W4A4_HADAMARD": 1.0}


@pytest.mark.parametrize("pipeline", list(E2E))
def test_tiny_model_end_to_end(tiny_models, pipeline):
    path = str(tiny_models["llama-q4_0"])
    tokens = list(range(5, 37))
    ref = Llama(path, n_ctx=64, verbose=False, tensor_overrides=["*=cpu-ref"])
    ref_logits = ref.session.eval(tokens, logits_from=0)
    llm = Llama(path, n_ctx=64, verbose=False, n_npu_layers="all", pipeline=pipeline)
    assert all(lin.runs_on.startswith("npu:") and lin.on_npu for lin in llm.model.linears)  # the output matmul too
    logits = llm.session.eval(tokens, logits_from=0)
    err = np.linalg.norm(logits - ref_logits) / np.linalg.norm(ref_logits)
    assert err < E2E[pipeline]
    out = llm.create_completion("the cat", max_tokens=4, temperature=0)  # decode: M = 1 calls
    assert out["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_float_models_run_w16a16(tiny_models, arch):
    path = str(tiny_models[arch])
    tokens = list(range(5, 30))
    ref = Llama(path, n_ctx=64, verbose=False, tensor_overrides=["*=cpu-ref"]).session.eval(tokens, logits_from=0)
    llm = Llama(path, n_ctx=64, verbose=False, n_npu_layers="all")
    assert {lin.runs_on for lin in llm.model.linears} == {"npu:W16A16"}  # float weights keep their values
    logits = llm.session.eval(tokens, logits_from=0)
    assert np.linalg.norm(logits - ref) < 3e-3 * np.linalg.norm(ref)  # fp16 rounding of x and W
