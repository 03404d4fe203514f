"""The kernels' other instruction-set paths, built outside the extension with the C compilers at hand.

The installed extension runs only the paths of this machine (-march=native). Here kernels.c is compiled with a small
C driver for: portable scalar C, x86 AVX2 without VNNI (if this CPU has AVX2), and aarch64 NEON with and without
dotprod run under qemu-aarch64 (if aarch64-linux-gnu-gcc and qemu-aarch64 are installed; Debian packages
gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user). Each must match the exact int8 emulation (see
test_kernels.py) for every type, path (rows, gemm, packed), activation precision (a8, a16) and a few M, with
identical results on 1 and 3 threads.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGMLQuantizationType as T
from test_kernels import KQUANT, SIMPLE, quantize_like_kernels, random_weight  # tests/cpu is on sys.path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "npulm" / "cpu"
HARNESS = Path(__file__).with_name("kernel_harness.c")


def _host_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _variants() -> list[tuple[str, list[str], list[str], str]]:
    """(id, compiler command, runner prefix, expected nl_isa) for what this machine can build and run."""
    out = []
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc:
        out.append(("scalar", [cc, "-O2"], [], "scalar"))
        if {"avx2", "fma", "f16c"} <= _host_flags():
            out.append(("avx2", [cc, "-O2", "-mavx2", "-mfma", "-mf16c"], [], "avx2"))
    xcc, qemu = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if xcc and qemu:
        runner = [qemu, "-cpu", "max"]
        out.append(("neon-dotprod", [xcc, "-O2", "-static", "-march=armv8.2-a+dotprod+fp16"], runner, "neon-dotprod"))
        out.append(("neon", [xcc, "-O2", "-static", "-march=armv8-a"], runner, "neon"))
    return out


VARIANTS = _variants()


@pytest.mark.skipif(not VARIANTS, reason="no C compiler")
@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_isa_variant(variant: tuple[str, list[str], list[str], str], tmp_path: Path) -> None:
    name, cc, runner, isa = variant
    exe = tmp_path / f"harness_{name}"
    subprocess.run([*cc, "-std=c11", f"-I{SRC}", str(SRC / "kernels.c"), str(HARNESS), "-o", str(exe), "-lpthread",
                    "-lm"], check=True, capture_output=True)
    rng = np.random.default_rng(7)
    cases, expect = [], []
    with open(tmp_path / "in.bin", "wb") as f:
        for t in SIMPLE + KQUANT + [T.F16]:
            n, k = 45, 512 if t in KQUANT else 544  # 17 blocks: tails after groups of 8 (x86) / 4 (NEON) blocks
            data = np.ascontiguousarray(random_weight(t, n, k, rng))
            w = (data.view(np.float16) if t == T.F16 else quants.dequantize(data, t)).astype(np.float64)
            for m, act16 in ((1, 0), (6, 0), (13, 0), (1, 1), (6, 1)):
                x = rng.standard_normal((m, k)).astype(np.float32)
                xq = x.astype(np.float64) if t == T.F16 else quantize_like_kernels(x, bool(act16))
                for path in (1, 2, 3):  # rows, gemm, packed (where the build has them)
                    for threads in (1, 3):
                        f.write(np.array([int(t), n, k, m, path, threads, act16, data.nbytes], np.int64).tobytes())
                        f.write(data.tobytes())
                        f.write(x.tobytes())
                        cases.append((t.name, m, act16, path, threads))
                        expect.append((xq @ w.T, np.abs(xq) @ np.abs(w).T))
    r = subprocess.run([*runner, str(exe), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == isa
    ys = np.fromfile(tmp_path / "out.bin", np.float32)
    pos, by_case = 0, {}
    for case, (ref, scale) in zip(cases, expect):
        y = ys[pos:pos + ref.size].reshape(ref.shape)
        pos += ref.size
        assert np.all(np.abs(y - ref) <= 1e-5 * scale + 1e-30), case
        by_case[case] = y
    assert pos == ys.size
    for (t, m, act16, path, threads), y in by_case.items():
        if threads == 3:
            assert np.array_equal(y, by_case[(t, m, act16, path, 1)]), (t, m, act16, path)
