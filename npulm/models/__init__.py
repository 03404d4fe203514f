"""One module per architecture, chosen by GGUF `general.architecture`; each has `from_gguf(loader, n_ctx)`."""

from __future__ import annotations

import importlib

from ..gguf import GGUFError, GGUFFile
from ..placement import Placement
from .base import Model, WeightLoader
from .validate import check_tensor_shapes

ARCHITECTURES = ("llama", "qwen2", "qwen3", "qwen3moe", "olmoe", "gemma3", "rwkv6", "rwkv7")


def load_model(gguf: GGUFFile, n_ctx: int, placement: Placement | None = None, progress: bool = False) -> Model:
    """Build the model of a GGUF file; `placement` builds each matmul weight's Linear (default: all on the CPU)."""
    arch = gguf.architecture
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{gguf.path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    module = importlib.import_module(f"{__name__}.{arch}")
    loader = WeightLoader(gguf, placement or Placement(), progress)
    try:
        model = module.from_gguf(loader, n_ctx)
    finally:
        loader.close()  # the progress bar's line is cleared before any error is printed
    tokens = gguf.kv.get("tokenizer.ggml.tokens")
    check_tensor_shapes(gguf, model.config, len(tokens) if isinstance(tokens, list) else None)
    model.arch = arch
    return model
