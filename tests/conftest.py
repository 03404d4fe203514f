"""Shared fixtures: tiny GGUF models (gguf_writers.py) written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from gguf.constants import GGMLQuantizationType as T
from gguf_writers import write_tiny_model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny model per architecture (F32) plus quantized llama variants."""
    d = tmp_path_factory.mktemp("tiny")
    out = {arch: write_tiny_model(d / f"{arch}.gguf", arch, n_layer=3 if arch == "gemma3" else 2)
           for arch in ("llama", "qwen2", "gemma3")}
    out["llama-q8_0"] = write_tiny_model(d / "llama-q8_0.gguf", "llama", T.Q8_0)
    out["llama-q4_0"] = write_tiny_model(d / "llama-q4_0.gguf", "llama", T.Q4_0, tied=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_writer():
    """write_tiny_model for tests that need their own variants (a module's `from conftest import` may find another
    directory's conftest first)."""
    return write_tiny_model
