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


@pytest.mark.parametrize("pipeline", ["W16A16", "W8A8_STANDARD", "W8A8_CHANNEL", "W8A8_HADAMARD", "W8A16_CHANNEL",
                                      "W8A16_HADAMARD"])
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
        assert fast.dtype == np.float32, pipeline
        if "HADAMARD" in pipeline:  # the C rotation's butterfly rounds apart from numpy's products (~1e-16)
            assert np.abs(fast - ref).max() < 1e-6 * np.abs(ref).max(), (pipeline, m)
        else:
            assert np.array_equal(fast, ref), (pipeline, m)
    pr.close()
    arena.close()


@pytest.mark.parametrize("k,pad", [(576, False), (1536, False), (576, True)])
def test_rotate_equals_numpy(k, pad):
    from npulm.npu import quant as qm

    rot = qm.padded_hadamard_rotation(k, seed=3) if pad else qm.block_hadamard_rotation(k, seed=3)
    x = np.random.default_rng(k).standard_normal((70, k))
    out = np.empty((70, rot.k_pad))
    planner._host.rotate(x, rot.signs, out, 70, k, rot.k_pad, rot.block)
    ref = qm.rotate_activation(x, rot)
    assert np.abs(out - ref).max() < 1e-14 * np.abs(ref).max()  # a butterfly vs numpy's Kronecker products
    with pytest.raises(ValueError, match="rotate"):
        planner._host.rotate(x, rot.signs, out, 70, k, rot.k_pad, 48)


def test_a_host_module_built_from_older_sources_is_not_used():
    """An extension missing a function the code calls (built before an update) falls back to numpy, with a warning
    saying how to rebuild, instead of failing mid-call."""
    import types

    from npulm.npu.planner import HOST_FUNCTIONS, usable_host

    stale = types.SimpleNamespace(**{f: None for f in HOST_FUNCTIONS if f != "rotate"})
    with pytest.warns(RuntimeWarning, match="built from older sources"):
        assert usable_host(stale) is None
    fresh = types.SimpleNamespace(**{f: None for f in HOST_FUNCTIONS})
    assert usable_host(fresh) is fresh and usable_host(None) is None
