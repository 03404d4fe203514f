"""One NPU owner per board: a second process that wants the NPU gets an error naming the holder."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from npulm.npu import owner

HOLD = "from npulm.npu import owner; o = owner.claim(holder='npulm serve test'); print('held', flush=True); input()"


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(owner.RUNTIME_DIR_ENV, str(tmp_path))
    return tmp_path


def hold(env=None):
    p = subprocess.Popen([sys.executable, "-c", HOLD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_claim_names_the_holder_and_the_lock_dies_with_it(runtime_dir):
    p = hold()
    try:
        with pytest.raises(owner.NpuBusy, match=rf"pid {p.pid} \(npulm serve test\).*-ngl 0"):
            owner.claim()
    finally:
        p.communicate("")
    mine = owner.claim()  # the holder exited: the kernel dropped its lock
    mine.release()


def test_a_second_npulm_process_on_the_npu_gets_a_clear_error(runtime_dir, tiny_models, monkeypatch):
    """Two real processes: one holds the NPU, `npulm run -ngl all` in another says who has it and exits 1;
    with -ngl 0 (the CPU) it runs."""
    import os

    env = {**os.environ, owner.LOCK_ENV: "1"}  # the emulator takes the lock as a board's runtime does
    p = hold(env)
    try:
        cmd = [sys.executable, "-m", "npulm.cli", "run", "-m", str(tiny_models["llama"]), "-p", "the", "-n", "2",
               "-c", "32"]
        t0 = time.monotonic()
        r = subprocess.run([*cmd, "-ngl", "all"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1 and f"NPU is in use by pid {p.pid} (npulm serve test)" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and time.monotonic() - t0 < 60
        r = subprocess.run([*cmd, "-ngl", "0"], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, r.stderr
    finally:
        p.communicate("")
