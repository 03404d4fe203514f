"""llama.cpp as the oracle, through llama-cpp-python (optional: `pip install llama-cpp-python`).

Used by the parity tests and benchmarks: per-position logits, perplexity by the same method, greedy continuations.
"""

from __future__ import annotations

import numpy as np

from .evaluate import Perplexity, perplexity


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


class LlamaCpp:
    """A llama.cpp context with logits for every position (logits_all=True)."""

    def __init__(self, model_path: str, n_ctx: int = 512, n_threads: int = 2):
        from llama_cpp import Llama

        self.llm = Llama(model_path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, verbose=False,
                         n_threads=n_threads, n_threads_batch=n_threads)
        self.n_ctx = n_ctx

    def tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """(len(tokens), n_vocab) logits of a fresh sequence."""
        self.llm.reset()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[:len(tokens)], dtype=np.float32)

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt)
        out = []
        for _ in range(n):
            tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
            out.append(tok)
            self.llm.eval([tok])
        return out

    def perplexity(self, tokens: list[int], n_chunks: int, bos_id: int | None) -> Perplexity:
        def eval_chunk(chunk: list[int], first: int) -> np.ndarray:
            return self.logits(chunk)[first:]

        return perplexity(eval_chunk, tokens, self.n_ctx, n_chunks, bos_id=bos_id, progress=False, out=None)
