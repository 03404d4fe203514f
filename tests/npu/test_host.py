"""The C host work (npulm.npu._host) gives the numpy path's numbers exactly."""

import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType as T

from npulm.linear import Weight
from npulm.npu import planner
from npulm.npu import prepared as P
from npulm.npu.emulator import EmulatorRuntime
from npulm.npu.planner import Arena

pytestmark = pytest.mark.skipif(planner._host is None, reason="C extension not built")


def _weight(k: int, n: int) -> Weight:
    w = (np.random.default_rng(1).standard_normal((n, k)) * 0.05).astype(np.float16)
    return Weight(f"blk.0.t.{k}x{n}", T.F16, n, k, w)


@pytest.mark.parametrize("pipeline", ["W16A16", "W8A8_STANDARD", "W8A8_CHANNEL", "W8A8_HADAMARD"])
@pytest.mark.parametrize("k,n", [(576, 192), (640, 1024), (8960, 96)])
def test_c_host_path_is_bit_identical(pipeline, k, n, monkeypatch):
    arena = Arena(EmulatorRuntime("rk3588"))
    pr = P.prepare(pipeline, _weight(k, n), arena)
    rng = np.random.default_rng(k + n)
    for m in (1, 3, 130):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[0, 5] = 40.0  # an outlier channel
        if m > 1:
            x[1] = 0.0  # a zero row (scale 0)
        fast = pr(x)
        with monkeypatch.context() as mp:
            mp.setattr(P, "_host", None)
            ref = pr(x)
        assert fast.dtype == np.float32 and np.array_equal(fast, ref), (pipeline, m)
    pr.close()
    arena.close()
