"""What every architecture shares: GGUF hyper-parameter reading, weight loading through placement, the
embedding -> blocks -> norm -> output skeleton, and the KV caches."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..gguf import GGUFError, GGUFFile
from ..linear import Linear, Weight, make_linear
from .blocks import KVCache, rms_norm


def hparam(kv: dict[str, Any], arch: str, key: str, default: Any = GGUFError) -> Any:
    """`{arch}.{key}` from GGUF metadata; a missing required key raises GGUFError naming it."""
    value = kv.get(f"{arch}.{key}", default)
    if value is GGUFError:
        raise GGUFError(f"missing metadata key {arch}.{key}")
    return value


class WeightLoader:
    """Reads a model's tensors by GGUF name: norms and biases as float32, matmul weights as placed Linears."""

    def __init__(self, gguf: GGUFFile, spec_for: Callable[[Weight], str], progress: bool = False):
        self.gguf, self.spec_for = gguf, spec_for
        self.linears: list[Linear] = []
        n_weights = sum(len(t.shape) == 2 for t in gguf.tensors.values())
        self.bar = tqdm(total=n_weights, desc="loading", unit="tensor", disable=not progress, file=sys.stderr,
                        leave=False)

    def close(self) -> None:
        self.bar.close()

    def has(self, name: str) -> bool:
        return name in self.gguf.tensors

    def vector(self, name: str) -> np.ndarray:
        return np.ascontiguousarray(self.gguf.dequantize(name).reshape(-1))

    def optional_vector(self, name: str) -> np.ndarray | None:
        return self.vector(name) if self.has(name) else None

    def gguf_weight(self, name: str) -> Weight:
        return Weight.from_gguf(self.gguf, name)

    def linear(self, name: str) -> Linear:
        weight = Weight.from_gguf(self.gguf, name)
        lin = make_linear(weight, self.spec_for(weight))
        self.linears.append(lin)
        self.bar.update()
        return lin


class Block(Protocol):
    cache: KVCache

    def __call__(self, x: np.ndarray, pos: int) -> np.ndarray: ...


@dataclass
class Embedding:
    """Token embedding rows read from the GGUF tensor (any type) on demand: no float copy of the table."""

    weight: Weight
    scale: float = 1.0

    def __post_init__(self) -> None:
        from ..cpu import row_reader

        self._rows = row_reader(self.weight)  # C dequantizer where it reads the type, else gguf.quants

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        x = self._rows(tokens) if self._rows is not None else self.weight.dequantize(tokens)
        if self.scale != 1.0:
            x *= np.float32(self.scale)
        return x


class Model:
    """tokens -> embedding -> blocks -> output norm -> output matmul -> logits. Architectures build the blocks."""

    arch = "base"

    def __init__(self, config: Any, embedding: Embedding, blocks: list[Block], output_norm: np.ndarray,
                 output: Linear, norm_eps: float, n_ctx: int, linears: list[Linear]):
        self.config, self.embedding, self.blocks = config, embedding, blocks
        self.output_norm, self.output, self.norm_eps = output_norm, output, norm_eps
        self.n_ctx, self.linears = n_ctx, linears
        self.n_vocab = output.n_out

    def forward(self, tokens: np.ndarray | list[int], pos: int, logits_from: int = -1) -> np.ndarray:
        """Run M tokens at positions pos..pos+M-1 through the model, filling the KV cache.

        Returns the logits of batch rows logits_from.. : (1, n_vocab) for the last token by default,
        (M, n_vocab) with logits_from=0.
        """
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        m = len(tokens)
        if pos < 0 or pos + m > self.n_ctx:
            raise ValueError(f"context overflow: positions {pos}..{pos + m - 1} exceed n_ctx={self.n_ctx}")
        if m and (tokens.min() < 0 or tokens.max() >= self.embedding.weight.n_out):
            raise ValueError(f"token id out of range 0..{self.embedding.weight.n_out - 1}")
        x = self.embedding(tokens)
        for block in self.blocks:
            x = block(x, pos)
        x = x[logits_from:]
        x = rms_norm(x, self.output_norm, self.norm_eps)
        return self.output(x)


def output_linear(w: WeightLoader) -> Linear:
    """output.weight, or the token embedding when the model ties them."""
    return w.linear("output.weight" if w.has("output.weight") else "token_embd.weight")
