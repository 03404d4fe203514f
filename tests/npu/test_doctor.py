"""`npulm doctor` on the emulator (this machine has no NPU): it must say so, run every check and give verdicts."""

from __future__ import annotations

import pytest

from npulm.cli import main
from npulm.npu import pipelines as P


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["doctor", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_doctor_on_the_emulator(capsys):
    rc, out, _ = run(capsys, "--runtime", "emulator")
    assert rc == 0
    assert "EMULATOR" in out and "NOT an NPU" in out
    assert "open-file limit" in out and "librknnrt version" in out
    assert "packed/rows kernel, Q4_0 4k x 4k   M = 1: " in out or "packed CPU kernel" in out
    for t in (1, 2, 4, 10):
        assert f"type {t:2d}" in out
    assert "types rknn_matmul_create accepts   1, 2, 4, 10" in out
    assert "INT4 A nibble order (even element) low nibble" in out
    assert "INT16 overflow (7*7*1024)          saturates" in out
    assert "ok   A/B/C as views at offsets" in out
    for name in P.PIPELINES:
        line = next(ln for ln in out.splitlines() if f" {name} " in ln)
        assert line.startswith("  ok") and "WRONG" not in line
    assert "0 problem(s) on the emulator (not hardware)" in out


def test_doctor_chip_without_int4(capsys):
    rc, out, err = run(capsys, "--runtime", "emulator", "--chip", "rk3568")
    assert rc == 0, err
    assert "type 10 int4xint4->int16" in out and "INT4 probes" in out
    assert "W4A8_BLOCK" in out and "INT8xINT8->INT32" in out
    assert f"Q4_0 -> {P.BEST_QUANTIZED}" in out


def test_doctor_without_librknnrt(capsys, monkeypatch):
    from npulm.npu import rknn

    monkeypatch.setattr(rknn, "find_library", lambda: None)
    monkeypatch.setattr("npulm.npu.device.find_library", lambda: None)
    rc, _, err = run(capsys, "--runtime", "rknn")
    assert rc == 1 and "librknnrt.so not found" in err


@pytest.mark.parametrize("flag", ["--help"])
def test_doctor_help(capsys, flag):
    assert main(["doctor", flag]) == 0
    assert "--runtime" in capsys.readouterr().out


def test_doctor_writes_the_boards_int4_nibble_order(capsys, monkeypatch, tmp_path):
    """A board whose native A takes the even element in the high nibble (the emulator set so) while npulm packs the
    low one first: doctor finds it, writes it into the profile, and npulm then packs that way."""
    import json

    from npulm.npu import doctor
    from npulm.npu import layout as L
    from npulm.npu.emulator import EmulatorRuntime

    monkeypatch.delenv(L.NIBBLES_ENV, raising=False)
    monkeypatch.delenv("NPULM_COST_PROFILE", raising=False)
    board = L.NibbleOrder(a_native="high")
    monkeypatch.setattr(doctor, "open_runtime", lambda *a, **k: EmulatorRuntime("rk3588", nibbles=board))
    rc, out, _ = run(capsys, "--runtime", "emulator")
    assert "INT4 A nibble order (even element) high nibble" in out
    assert f"{L.NIBBLES_ENV}=a_native=high" in out and rc != 0  # a problem until set
    profile = tmp_path / "board.json"
    profile.write_text(json.dumps({"constants": {"launch_s": 4e-5}}))
    run(capsys, "--runtime", "emulator", "--profile", str(profile))
    data = json.loads(profile.read_text())
    assert data["nibbles"]["a_native"] == "high" and data["constants"] == {"launch_s": 4e-5}
    monkeypatch.setenv("NPULM_COST_PROFILE", str(profile))
    assert L.nibble_setting() == board
    rc, out, _ = run(capsys, "--runtime", "emulator")  # now npulm packs as the board reads: nothing to fix
    assert "nibble first" not in out


@pytest.mark.parametrize("pipeline", ["W4A4_CHANNEL", "W4A8_BLOCK"])
def test_int4_pipelines_under_both_nibble_orders(tiny_models, monkeypatch, pipeline):
    """The nibble order setting reaches the packing: on an emulator reading A in that order, INT4 pipelines give
    the same numbers with either order, and the packed A bytes differ (swapped nibbles)."""
    import numpy as np

    from npulm.gguf import GGUFFile
    from npulm.linear import Weight
    from npulm.npu import layout as L
    from npulm.npu.device import open_runtime
    from npulm.npu.planner import Arena
    from npulm.npu.prepared import prepare

    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    x = np.random.default_rng(0).standard_normal((2, w.n_in)).astype(np.float32)
    ys, packed = [], []
    for order in ("low", "high"):
        monkeypatch.setenv(L.NIBBLES_ENV, f"a_native={order}")
        rt = open_runtime("emulator", "rk3588")
        assert rt.nibbles.a_native == order
        arena = Arena(rt)
        pr = prepare(pipeline, w, arena)
        ys.append(pr(x))
        bk = pr.ops[0].bucket(2)
        packed.append(bytes(np.asarray(bk.a_arr).tobytes()))
        pr.close()
        arena.close()
    assert np.array_equal(ys[0], ys[1])
    lo, hi = np.frombuffer(packed[0], np.uint8), np.frombuffer(packed[1], np.uint8)
    assert np.any(lo != hi) and np.array_equal((lo >> 4) | ((lo & 0x0F) << 4), hi)


def test_bad_nibble_setting_is_a_clear_error(monkeypatch):
    from npulm.npu import layout as L

    monkeypatch.setenv(L.NIBBLES_ENV, "a=high")
    with pytest.raises(ValueError, match="KIND=low|high"):
        L.nibble_setting()
    monkeypatch.setenv(L.NIBBLES_ENV, "a_native=middle")
    with pytest.raises(ValueError, match="'low' or 'high'"):
        L.nibble_setting()
