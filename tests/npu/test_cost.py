import json
import math

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as Q

from npulm.npu import cost as C
from npulm.npu.chips import get_chip


def test_fitted_rows_are_reproduced():
    for row in C.FIT_ROWS:
        assert C.predict(C.constants(row.chip), row) == pytest.approx(row.value, rel=0.01), row.label()
    c = C.constants("rk3588")
    for name, _chip, fn, target, _ in C.MICRO_FITS:
        assert fn(c) == pytest.approx(target, rel=0.01), name


def test_every_constant_has_a_source_and_a_value():
    for chip, table in C.CONSTANTS.items():
        c = C.constants(chip)
        for name, const in table.items():
            assert const.source, (chip, name)
            assert c[name] is not None and c[name] >= 0, (chip, name)
            if const.value is None:
                assert const.source.startswith("fit:") or "[I]" in const.source, (chip, name)


def test_held_out_rows_stay_near_the_published_ones():
    """The held-out rows the issue names (all of rk-llama.cpp's RK3588 Gemma3-1B / Granite-350M rows, RKLLM's
    decode, unimatrix's 1.5B pp128 and tg) within the issue's +-25 % (docs give each ratio)."""
    named = [r for r in C.HELD_OUT if r.model in ("gemma3_1b", "granite4_350m", "qwen2_0_5b", "tinyllama_1_1b",
                                                    "qwen2_5_1_5b") and r.chip == "rk3588"]
    assert len(named) >= 24
    ratios = [C.predict(C.constants(r.chip), r) / r.value for r in named]
    assert all(0.75 <= x <= 1.25 for x in ratios), [(r.label(), round(x, 2)) for r, x in zip(named, ratios)]


def test_npu_call_reproduces_the_m128_rows_it_was_not_solved_from():
    """ops and npu_row_s come from wtwver's K=N=1024 and K=N=4096 INT8 rows at M=128 (one core); its other rows
    are checks: K=N=2048 703 us, K=2048 N=8192 2.39 ms, K=4096 N=8192 4.48 ms."""
    c = C.constants("rk3588")
    for k, n, published in ((2048, 2048, 703e-6), (2048, 8192, 2.39e-3), (4096, 8192, 4.48e-3)):
        g = C.simple_geometry(k, n, "int8", "native", 1)
        assert C.npu_time(c, g, 128, C.HostCost(0.0, 0.0)) == pytest.approx(published, rel=0.06), (k, n)


def test_prefill_cpu_work_besides_the_matmuls():
    """The activation passes grow with the attention scores (n_kv x heads): Granite's 16 heads of 64 cost more per
    token at 512 than Gemma3-1B's 4 heads of 256 with the same q width; at n=1 only the vectors are left."""
    c = C.constants("rk3588")
    granite, gemma = C.published_shape("granite4_350m", "F16"), C.published_shape("gemma3_1b", "F16")
    scores = lambda s, n: C.prefill_layer_bytes(s, n) - C.prefill_layer_bytes(s, 1)  # noqa: E731
    assert scores(granite, 512) == pytest.approx(4 * scores(gemma, 512), rel=0.01)
    d, q, kv, ffn = granite.dims()
    assert (d, q, kv, ffn) == (1024, 1024, 256, 2048)
    t = C.prefill_cpu_time(c, granite, 512)
    assert t > C.attention_time(c, granite, 512)
    assert t - C.attention_time(c, granite, 512) == pytest.approx(
        28 * 512 * C.prefill_layer_bytes(granite, 512) / c["cpu_bw"])


def test_profile_replaces_published_constants(tmp_path):
    p = tmp_path / "board.json"
    p.write_text(json.dumps({"chip": "rk3588", "constants": {"launch_s": 50e-6}}))
    assert C.constants("rk3588", str(p))["launch_s"] == 50e-6
    assert C.constants("rk3588")["launch_s"] == pytest.approx(32.9e-6)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"chip": "rk3588", "constants": {"launchs": 1}}))
    with pytest.raises(ValueError, match="unknown constants"):
        C.constants("rk3588", str(bad))


def test_npu_time_terms():
    c = C.constants("rk3588")
    g = C.simple_geometry(2048, 2048, "int8", "native", 3)
    host = C.HostCost(0.0, 0.0)
    t1, t8, t512 = (C.npu_time(c, g, m, host) for m in (1, 8, 512))
    # M = 1..8 cost the same but for the per-row cost (bandwidth-bound), as measured on boards
    assert t8 == pytest.approx(t1 + 7 * c["npu_row_s"])
    assert t8 < 1.05 * t1
    assert t512 > 4 * t1
    bytes_core = 2048 * 2048 / 3
    assert t1 == pytest.approx(c["launch_s"] + c["npu_row_s"] + bytes_core / (c["bw_total"] / 3))


# ----------------------------------------------------------------------------------------------------- geometry


def _weight(k, n, qtype):
    import gguf

    from npulm.linear import Weight

    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.05).astype(np.float32)
    raw = w.astype(np.float16) if qtype == Q.F16 else gguf.quants.quantize(w, qtype)
    return Weight(f"blk.0.t.{k}x{n}", qtype, n, k, raw)


@pytest.mark.parametrize("pipeline,qtype", [
    ("W16A16", Q.F16), ("W8A8_CHANNEL", Q.F16), ("W8A8_HADAMARD", Q.Q8_0), ("W8A16_CHANNEL", Q.Q4_0),
    ("W8A16_HADAMARD", Q.Q8_0), ("W4A8_BLOCK", Q.Q4_0), ("W4A4_CHANNEL", Q.Q8_0)])
@pytest.mark.parametrize("k,n", [(576, 192), (1536, 576)])
def test_geometry_matches_the_planner(pipeline, qtype, k, n):
    from npulm.npu.emulator import EmulatorRuntime
    from npulm.npu.planner import Arena
    from npulm.npu.prepared import prepare

    arena = Arena(EmulatorRuntime("rk3588"))
    pr = prepare(pipeline, _weight(k, n, qtype), arena)
    op = pr.ops[0]
    g = C.npulm_geometry(pipeline, k, n, qtype.name, arena.chip)
    assert (g.chunk_k, g.n_chunks, g.n_slices, g.rows_per_token, g.n_pad) == (
        op.chunk_k, op.n_chunks, len(op.slices), op.row_factor, op.n_pad)
    assert g.b_bytes == op.b_bytes
    assert g.max_rows == pr.max_m
    assert g.calls(1) == sum(len(cs) for cs in op.bucket(1).ctxs)
    pr.close()
    arena.close()


# calls per token (decode, block linears) per pipeline from the planner: a guard against chunk explosions
SMOLLM2_CALLS = {"W16A16": 630, "W8A8_STANDARD": 630, "W8A8_CHANNEL": 630, "W8A8_HADAMARD": 630,
                 "W8A16_CHANNEL": 630, "W8A16_HADAMARD": 630}


def test_calls_per_token_per_pipeline():
    from npulm.plan import Choice, Planner

    pl = Planner(C.published_shape("smollm2_135m", "Q4_1"), get_chip("rk3588"))
    for name, calls in SMOLLM2_CALLS.items():
        st = pl.stats({li: Choice(name) for li in pl.shape.linears})
        assert st["calls_per_token"] == calls, name
    # one call per core per K-chunk: 3 cores x 7 linears x 30 layers
    assert pl.stats({li: Choice("W16A16") for li in pl.shape.linears})["serial_calls_per_token"] == 210


def test_rk3576_has_no_int4xint4():
    chip = get_chip("rk3576")
    g = C.npulm_geometry("W16A16", 1024, 1024, "F16", chip)
    assert g.n_slices == 2 and g.dtype == "fp16"
    assert math.isfinite(C.tg_tok_s(C.constants("rk3576"), C.published_shape("qwen2_0_5b", "Q8_0"), C.IMPLS["rkllm"]))


def test_calibrate_refuses_the_emulator():
    from npulm.npu.calibrate import CalibrationError, calibrate
    from npulm.npu.emulator import EmulatorRuntime

    with pytest.raises(CalibrationError, match="emulator has no timing"):
        calibrate(EmulatorRuntime("rk3588"))


def test_calibrate_writes_a_profile_the_cost_model_loads(double_lib, tmp_path):
    """Through the real ctypes path (the librknnrt test double: timings meaningless, the plumbing real)."""
    from npulm.npu.calibrate import calibrate, write_profile
    from npulm.npu.librknnrt import RknnRuntime

    prof = calibrate(RknnRuntime(double_lib, chip="rk3588"), reps=3, quick=True)
    assert prof["chip"] == "rk3588" and prof["constants"]["launch_s"] > 0
    assert {"bw_core", "bw_total", "ops_int8_native", "ops_fp16_native", "npu_row_s", "host_a76_factor",
            "host_threads"} <= set(prof["constants"])
    path = tmp_path / "board.json"
    write_profile(prof, str(path))
    c = C.constants("rk3588", str(path))
    assert c["launch_s"] == prof["constants"]["launch_s"] and c["bw_total"] == prof["constants"]["bw_total"]


def test_doctor_calibrate_says_it_cannot_on_the_emulator(capsys, tmp_path):
    from npulm import cli

    assert cli.main(["doctor", "--runtime", "emulator", "--calibrate", str(tmp_path / "p.json")]) == 1
    assert "emulator has no timing" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
