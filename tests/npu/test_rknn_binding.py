"""The ctypes binding: struct ABI, error mapping, library discovery and SDK version checks."""

from __future__ import annotations

import ctypes
import pickle

import numpy as np
import pytest

from npulm.npu import rknn as R
from npulm.npu.device import open_runtime
from npulm.npu.librknnrt import RknnRuntime

# (struct, size, {field: offset}) per the SDK 2.1-2.3.2 headers (LP64)
LAYOUTS = [
    (R.RknnTensorMem, 40, {"virt_addr": 0, "phys_addr": 8, "fd": 16, "offset": 20, "size": 24, "flags": 28,
                           "priv_data": 32}),
    (R.RknnQuantParams, 288, {"name": 0, "scale": 256, "scale_len": 264, "zp": 272, "zp_len": 280}),
    (R.RknnMatmulTensorAttr, 332, {"name": 0, "n_dims": 256, "dims": 260, "size": 324, "type": 328}),
    (R.RknnMatmulIoAttr, 996, {"A": 0, "B": 332, "C": 664}),
    (R.RknnMatmulShape, 12, {"M": 0, "K": 4, "N": 8}),
    (R.RknnMatmulInfo, 64, {"M": 0, "K": 4, "N": 8, "type": 12, "B_layout": 16, "B_quant_type": 18, "AC_layout": 20,
                            "AC_quant_type": 22, "iommu_domain_id": 24, "group_size": 28, "reserved": 30}),
    (R.RknnSdkVersion, 512, {"api_version": 0, "drv_version": 256}),
]


@pytest.mark.parametrize("struct, size, offsets", LAYOUTS, ids=[s[0].__name__ for s in LAYOUTS])
def test_struct_sizes_and_offsets(struct, size, offsets):
    if ctypes.sizeof(ctypes.c_void_p) != 8 and struct in (R.RknnTensorMem, R.RknnQuantParams):
        pytest.skip("pointer-holding structs differ on 32-bit")
    assert ctypes.sizeof(struct) == size
    assert [f[0] for f in struct._fields_] == list(offsets)
    for name, off in offsets.items():
        assert getattr(struct, name).offset == off, name


def test_context_handle_width():
    assert ctypes.sizeof(R.rknn_context) == (8 if ctypes.sizeof(ctypes.c_void_p) == 8 else 4)


def test_every_error_code_has_its_own_class():
    classes = set()
    for code, name in R.ERROR_NAMES.items():
        e = R.RknnError(code, "rknn_matmul_run")
        assert type(e) is not R.RknnError and isinstance(e, R.RknnError)
        assert e.code == code and name in str(e) and "rknn_matmul_run" in str(e)
        classes.add(type(e))
    assert len(classes) == len(R.ERROR_NAMES)
    assert type(R.RknnError(-99, "f")) is R.RknnError
    assert isinstance(R.RknnError(-5, "f"), R.RknnParamInvalid)
    e = pickle.loads(pickle.dumps(R.RknnError(-7, "rknn_matmul_destroy", "gone")))
    assert isinstance(e, R.RknnCtxInvalid) and e.detail == "gone"
    with pytest.raises(R.RknnTimeout):
        R.check(-2, "rknn_matmul_run")
    assert R.check(0, "rknn_matmul_run") == 0


def test_find_library_env(monkeypatch, tmp_path, double_lib):
    for var in R.LIB_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RKNN_LIB", double_lib)
    assert R.find_library() == double_lib
    monkeypatch.delenv("RKNN_LIB")
    monkeypatch.setenv("LIBRKNNRT_PATH", str(tmp_path))  # a directory without the library: ignored
    assert R.find_library() != str(tmp_path / "librknnrt.so")
    monkeypatch.setenv("LIBRKNNRT_PATH", str(__import__("pathlib").Path(double_lib).parent))
    assert R.find_library() == double_lib


def test_version_from_embedded_string(double_lib):
    assert R.version_from_file(double_lib) == "2.3.2"
    lib = R.RknnLib(double_lib)
    assert lib.sdk_version == "2.3.2"
    assert lib.rknn_matmul_create_dynamic_shape is not None


def test_version_from_rknn_query(double_lib_query_only):
    assert R.version_from_file(double_lib_query_only) is None
    lib = R.RknnLib(double_lib_query_only)
    assert lib.sdk_version == "2.3.2 (test double)" and lib.driver_version == "0.9.8"


def test_sdk_1_6_is_refused(double_lib_v16, monkeypatch):
    with pytest.raises(R.RknnVersionError, match=r"1\.6\.0.*24-byte"):
        R.RknnLib(double_lib_v16)
    with pytest.raises(R.RknnVersionError):
        open_runtime("rknn", lib_path=double_lib_v16)
    rt = open_runtime("auto", chip="rk3588", lib_path=double_lib_v16)  # auto falls back, saying why
    assert rt.kind == "emulator"


def test_missing_library(tmp_path):
    with pytest.raises(R.RknnLoadError, match="cannot load"):
        R.RknnLib(str(tmp_path / "nope.so"))


def test_open_runtime_selection(monkeypatch, double_lib):
    for var in R.LIB_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RKNN_LIB", double_lib)
    rt = open_runtime(chip="rk3588")
    assert isinstance(rt, RknnRuntime) and rt.kind == "rknn" and rt.sdk_version == "2.3.2"
    assert open_runtime("emulator", chip="rk3588").kind == "emulator"
    monkeypatch.setenv("NPULM_NPU_RUNTIME", "emulator")
    assert open_runtime(chip="rk3588").kind == "emulator"
    with pytest.raises(ValueError):
        open_runtime("gpu")


@pytest.mark.parametrize("mm_type,k,n", [(1, 64, 48), (2, 96, 64), (10, 128, 256), (2, 8256, 32)])
def test_sdk_2_0_b_layout_helper_takes_its_own_signature(double_lib_v20, double_lib, mm_type, k, n):
    """SDK 2.0.x's rknn_B_normal_layout_to_native_layout(B_in, B_out, K, N, subN, subK, type): bound with that
    signature (the 2.1 form would pass a pointer where it reads subN), packing what 2.3.2's form packs."""
    from npulm.npu.runtime import MatmulInfo

    old, new = RknnRuntime(double_lib_v20, chip="rk3588"), RknnRuntime(double_lib, chip="rk3588")
    assert old.sdk_version.startswith("2.0") and old._b_layout_2_0 and not new._b_layout_2_0
    lim = 7 if mm_type == 10 else 100
    rng = np.random.default_rng(mm_type)
    b = rng.integers(-lim, lim + 1, (k, n)).astype(np.float16 if mm_type == 1 else np.int8)
    info = MatmulInfo(M=1, K=k, N=n, type=mm_type, B_layout=1, AC_layout=1)
    assert np.array_equal(old.B_normal_to_native(b, info), new.B_normal_to_native(b, info))


def test_sdk_2_0_runs_a_pipeline_like_the_emulator(double_lib_v20, tiny_models):
    from npulm.gguf import GGUFFile
    from npulm.linear import Weight
    from npulm.npu.emulator import EmulatorRuntime
    from npulm.npu.planner import Arena
    from npulm.npu.prepared import prepare

    w = Weight.from_gguf(GGUFFile(tiny_models["llama-q4_0"]), "blk.0.ffn_up.weight")
    x = np.random.default_rng(0).standard_normal((3, w.n_in)).astype(np.float32)
    ys = []
    for rt in (RknnRuntime(double_lib_v20, chip="rk3588"), EmulatorRuntime("rk3588")):
        arena = Arena(rt)
        pr = prepare("W4A8_BLOCK", w, arena)  # int4 B through the helper
        ys.append(pr(x))
        pr.close()
        arena.close()
    assert np.array_equal(ys[0], ys[1])
