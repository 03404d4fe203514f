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
