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


@pytest.fixture
def npu_predicted_fast(tmp_path, monkeypatch) -> Path:
    """A board profile (what `npulm doctor --calibrate` writes) under which the cost model predicts the NPU faster
    than the CPU at every batch size, so `npu:auto` / `-ngl N` place the tiny test models' weights on the NPU from
    M=1 (with the published constants the NPU's fixed costs lose on such small weights and auto keeps the CPU)."""
    import json

    fast = {"launch_s": 0.0, "npu_row_s": 0.0, "bw_core": 1e15, "bw_total": 1e15, "ops_int8_native": 1e18,
            "ops_fp16_native": 1e18, "ops_fp16_native_k4096": 1e18, "ops_fp16_native_k8192": 1e18,
            "ops_int4_native": 1e18, "host_a76_factor": 1e-9}
    path = tmp_path / "fast-npu-profile.json"
    path.write_text(json.dumps({"constants": fast}))
    monkeypatch.setenv("NPULM_COST_PROFILE", str(path))
    return path


@pytest.fixture(scope="session")
def weather_tools() -> list[dict]:
    """Two OpenAI tool definitions (an enum argument, a bounded integer) for the tool-call tests."""
    return [{"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "add", "parameters": {
                "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["a"], "additionalProperties": False}}}]
