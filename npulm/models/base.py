"""What every architecture shares: GGUF hyper-parameter reading, weight loading through placement, and the
embedding -> blocks -> norm -> output skeleton. The model holds weights only; per-sequence state lives in a cache
the caller makes with `Model.make_cache()` (see cache.py)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from tqdm import tqdm

from ..gguf import GGUFError, GGUFFile
from ..linear import Linear, Weight
from ..placement import MatmulSpec, Placement
from .blocks import rms_norm
from .cache import LayerCache, cache_offset
from .validate import check_hparam


def hparam(kv: dict[str, Any], arch: str, key: str, default: Any = GGUFError) -> Any:
    """`{arch}.{key}` from GGUF metadata, type- and range-checked by validate.HPARAMS; a missing required key or a
    bad value raises GGUFError naming it."""
    name = f"{arch}.{key}"
    if name not in kv:
        if default is GGUFError:
            raise GGUFError(f"missing metadata key {name}")
        return default
    return check_hparam(name, key, kv[name])


class WeightLoader:
    """Reads a model's tensors by GGUF name: norms and biases as float32, matmul weights as Linears built by the
    model's placement."""

    def __init__(self, gguf: GGUFFile, placement: Placement, progress: bool = False):
        self.gguf, self.placement = gguf, placement
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

    def spec_for(self, weight: Weight) -> MatmulSpec:
        return self.placement.spec_for(weight)

    def build(self, weight: Weight, spec: MatmulSpec | str | None = None) -> Linear:
        """The placed Linear of a weight (for `spec`, or the placement's target); not recorded in `linears`."""
        return self.placement.build(weight, spec)

    def linear(self, name: str) -> Linear:
        lin = self.build(Weight.from_gguf(self.gguf, name))
        self.linears.append(lin)
        self.bar.update()
        return lin


class Block(Protocol):
    def make_cache(self, n_ctx: int) -> LayerCache: ...

    def __call__(self, x: np.ndarray, caches: Sequence[LayerCache], spans: Sequence[tuple[int, int]]) -> np.ndarray:
        """x holds the rows of every sequence of a batch: rows spans[j] belong to the sequence whose cache for this
        layer is caches[j]."""


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

    def make_cache(self) -> list[LayerCache]:
        """A fresh cache for one sequence: one per-layer cache, sized for n_ctx tokens."""
        return [block.make_cache(self.n_ctx) for block in self.blocks]

    def forward(self, tokens: np.ndarray | Sequence[int], cache: list[LayerCache], logits_from: int = -1
                ) -> np.ndarray:
        """Run M tokens after those the cache holds, appending them to it.

        Returns the logits of rows logits_from.. : (1, n_vocab) for the last token by default, (M, n_vocab) with
        logits_from=0.
        """
        return self.forward_batch([tokens], [cache], logits_from)[0]

    def forward_batch(self, token_lists: Sequence[np.ndarray | Sequence[int]], caches: Sequence[list[LayerCache]],
                      logits_from: int = -1) -> list[np.ndarray]:
        """Several sequences, each at its own position, in one pass: every Linear sees M = all their tokens;
        attention runs per sequence over its own cache. Returns each sequence's logits of rows logits_from.."""
        seqs = [np.asarray(t, dtype=np.int64).reshape(-1) for t in token_lists]
        n_vocab_in = self.embedding.weight.n_out
        for tokens, cache in zip(seqs, caches, strict=True):
            pos, m = cache_offset(cache), len(tokens)
            if pos + m > self.n_ctx:
                raise ValueError(f"context overflow: positions {pos}..{pos + m - 1} exceed n_ctx={self.n_ctx}")
            if m and (tokens.min() < 0 or tokens.max() >= n_vocab_in):
                raise ValueError(f"token id out of range 0..{n_vocab_in - 1}")
        ends = np.cumsum([len(t) for t in seqs])
        spans = [(int(e - len(t)), int(e)) for t, e in zip(seqs, ends)]
        x = self.embedding(np.concatenate(seqs) if len(seqs) > 1 else seqs[0])
        for i, block in enumerate(self.blocks):
            x = block(x, [cache[i] for cache in caches], spans)
        if len(spans) == 1:
            x = x[logits_from:]
        else:  # only the rows whose logits are wanted go through the output matmul
            rows = [np.arange(a, b)[logits_from:] for a, b in spans]
            x = x[np.concatenate(rows)]
        logits = (self.output(self.final_norm(x)) if len(x)
                  else np.empty((0, self.n_vocab), np.float32))  # prefill pieces before the wanted rows
        return np.split(logits, np.cumsum([len(r) for r in rows])[:-1]) if len(spans) > 1 else [logits]


    def final_norm(self, x: np.ndarray) -> np.ndarray:
        """The norm before the output matmul (RMSNorm; RWKV's is a LayerNorm)."""
        return rms_norm(x, self.output_norm, self.norm_eps)

    def hidden(self, tokens: np.ndarray | Sequence[int], cache: list[LayerCache]) -> np.ndarray:
        """(M, n_embd) hidden states after the final norm of M tokens run after those the cache holds (appended to
        it): what llama.cpp returns as token embeddings."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if cache_offset(cache) + len(tokens) > self.n_ctx:
            raise ValueError(f"context overflow: {cache_offset(cache) + len(tokens)} tokens exceed n_ctx={self.n_ctx}")
        x = self.embedding(tokens)
        for layer_cache, block in zip(cache, self.blocks):
            x = block(x, [layer_cache], [(0, len(tokens))])
        return self.final_norm(x)


def output_linear(w: WeightLoader) -> Linear:
    """output.weight, or the token embedding when the model ties them."""
    return w.linear("output.weight" if w.has("output.weight") else "token_embd.weight")
