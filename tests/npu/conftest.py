"""Fixtures for the NPU runtime tests: the librknnrt test double (rknnrt_double.c) compiled per session."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

DOUBLE_SRC = Path(__file__).with_name("rknnrt_double.c")


def _build(out_dir: Path, *defines: str) -> str:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the librknnrt test double")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / "librknnrt.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", *defines, "-o", str(lib), str(DOUBLE_SRC)],
                   check=True, capture_output=True, text=True)
    return str(lib)


@pytest.fixture(scope="session")
def double_lib(tmp_path_factory) -> str:
    """Path of the SDK 2.3.2 test double."""
    return _build(tmp_path_factory.mktemp("rknnrt") / "v2")


@pytest.fixture(scope="session")
def double_lib_v16(tmp_path_factory) -> str:
    """A double reporting SDK 1.6.0 (struct layouts the binding must refuse)."""
    return _build(tmp_path_factory.mktemp("rknnrt") / "v16", "-DDOUBLE_SDK_1_6")


@pytest.fixture(scope="session")
def double_lib_query_only(tmp_path_factory) -> str:
    """A double without the embedded version string: the version comes from rknn_query only."""
    return _build(tmp_path_factory.mktemp("rknnrt") / "noversion", "-DDOUBLE_NO_VERSION_STRING")


@pytest.fixture(scope="session")
def double_lib_v20(tmp_path_factory) -> str:
    """A double reporting SDK 2.0.0b0, with that version's 7-argument rknn_B_normal_layout_to_native_layout."""
    return _build(tmp_path_factory.mktemp("rknnrt") / "v20", "-DDOUBLE_SDK_2_0")
