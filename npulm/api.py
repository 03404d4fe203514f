"""The Python API in llama-cpp-python's shape: Llama(model_path, n_ctx=..., ...), create_completion / __call__,
create_chat_completion (OpenAI-shaped dicts, or chunks with stream=True), tokenize / detokenize, eval + scores."""

from __future__ import annotations

import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from . import assets
from .generate import Session, stream_text
from .gguf import GGUFFile
from .models import load_model
from .placement import Placement, parse_overrides
from .sampling import make_sampler
from .tokenizer import Tokenizer

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # as llama.cpp: "random"


class Llama:
    def __init__(self, model_path: str | None = None, *, n_ctx: int = 512, n_batch: int = 512,
                 n_threads: int | None = None, seed: int = LLAMA_DEFAULT_SEED, logits_all: bool = False,
                 verbose: bool = True, n_npu_layers: int | str = 0, pipeline: str | None = None,
                 tensor_overrides: list[str] | None = None, chip: str | None = None, **_ignored: Any):
        self.model_path = str(assets.resolve_model(model_path))
        self.verbose = verbose
        t0 = time.perf_counter()
        self.gguf = GGUFFile(self.model_path)
        self.metadata = {k: v for k, v in self.gguf.kv.items() if not isinstance(v, (list, np.ndarray))}
        self.tokenizer = Tokenizer.from_gguf(self.gguf.kv)
        arch = self.gguf.architecture
        n_ctx_train = int(self.gguf.kv.get(f"{arch}.context_length", 4096))
        self._n_ctx = n_ctx_train if n_ctx <= 0 else n_ctx
        if n_threads:
            self.set_threads(n_threads)
        if chip or n_npu_layers:
            from . import npu  # configures the NPU backend (chip, runtime) before weights are placed

            npu.configure(chip=chip)
        self.placement = Placement(n_layer=int(self.gguf.kv.get(f"{arch}.block_count", 0)), npu_layers=n_npu_layers,
                                   pipeline=pipeline, overrides=parse_overrides(tensor_overrides))
        self.model = load_model(self.gguf, self._n_ctx, self.placement.spec_for, progress=verbose)
        self.session = Session(self.model, n_batch)
        self._lock, self._owner = threading.Lock(), None  # one sequence: calls from several threads are serialized
        self.logits_all = logits_all
        self.scores = np.zeros((self._n_ctx if logits_all else 1, self.model.n_vocab), np.float32)
        self._seed_rng = np.random.default_rng(None if seed == LLAMA_DEFAULT_SEED or seed < 0 else seed)
        self._chat_template = None
        self.load_time = time.perf_counter() - t0
        if verbose:
            print(f"npulm: loaded {self.model_path} ({arch}, {len(self.gguf.tensors)} tensors, n_ctx {self._n_ctx}) "
                  f"in {self.load_time:.2f} s", file=sys.stderr)

    # --- llama-cpp-python's small accessors ------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def token_bos(self) -> int:
        return self.tokenizer.bos_id

    def token_eos(self) -> int:
        return self.tokenizer.eos_id

    @property
    def n_tokens(self) -> int:
        return len(self.session.tokens)

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self.session.tokens, dtype=np.int64)

    @staticmethod
    def set_threads(n: int) -> None:
        from .cpu import set_num_threads  # without compiled kernels this is a no-op: BLAS picks its threads

        set_num_threads(n)

    # --- tokens ----------------------------------------------------------------------------------------------
    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """add_bos=True adds BOS when the vocabulary wants one (llama.cpp's add_special)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.tokenizer.encode(text, add_bos=None if add_bos else False, special=special)

    def detokenize(self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None,
                   special: bool = False) -> bytes:
        return b"".join(self.tokenizer.token_to_bytes(t, special=special) for t in tokens)

    # --- evaluation ------------------------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self.session.reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after those already in the context; logits land in self.scores (all rows if
        logits_all, else the last in scores[0])."""
        with self._lock:
            n0 = self.n_tokens
            logits = self.session.eval(tokens, logits_from=0 if self.logits_all else -1)
        if self.logits_all:
            self.scores[n0:n0 + len(tokens)] = logits
        else:
            self.scores[0] = logits[-1]

    # --- completion ------------------------------------------------------------------------------------------
    def _sampler(self, temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float,
                 seed: int | None):
        if seed is None or seed < 0:
            seed = int(self._seed_rng.integers(0, 2**31 - 1))
        return make_sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)

    def _stream(self, prompt_tokens: list[int], max_tokens: int | None, stop: str | list[str] | None,
                sampler) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish_reason or None, completion token count), holding the model's lock throughout: one
        Llama is one sequence, so concurrent calls run one after the other."""
        if self._owner == threading.get_ident():
            raise RuntimeError("this Llama is already generating in this thread (an unfinished stream?): "
                               "finish or close it first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield from stream_text(self.session, self.tokenizer, prompt_tokens, sampler, max_tokens, stop)
            finally:
                self._owner = None

    def create_completion(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          stop: str | list[str] | None = None, repeat_penalty: float = 1.0, top_k: int = 40,
                          stream: bool = False, seed: int | None = None, echo: bool = False,
                          **_ignored: Any) -> dict | Iterator[dict]:
        tokens = prompt if isinstance(prompt, list) else self.tokenize(prompt)
        if not tokens:
            tokens = [self.token_bos()]
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        cid, created = f"cmpl-{uuid.uuid4()}", int(time.time())
        head = prompt if echo and isinstance(prompt, str) else ""

        def chunk(text: str, reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": self.model_path,
                    "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}]}

        parts = self._stream(tokens, max_tokens, stop, sampler)
        if stream:
            def chunks() -> Iterator[dict]:
                if head:
                    yield chunk(head, None)
                for text, reason, _ in parts:
                    if text or reason:
                        yield chunk(text, reason)
            return chunks()
        text, reason, n = head, "stop", 0
        for delta, r, count in parts:
            text += delta
            reason, n = r or reason, count
        out = chunk(text, reason)
        out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
        return out

    __call__ = create_completion

    # --- chat ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self):
        if self._chat_template is None:
            from .chat import ChatTemplate

            self._chat_template = ChatTemplate.from_gguf(self.gguf.kv)
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kw)
        tokens = self.tokenizer.encode(text, add_bos=False, special=True)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def create_chat_completion(self, messages: list[dict], temperature: float = 0.2, top_p: float = 0.95,
                               top_k: int = 40, min_p: float = 0.05, stream: bool = False,
                               stop: str | list[str] | None = None, seed: int | None = None,
                               max_tokens: int | None = None, repeat_penalty: float = 1.0,
                               tools: list[dict] | None = None, **_ignored: Any) -> dict | Iterator[dict]:
        tokens = self.apply_chat_template(messages, tools=tools)
        sampler = self._sampler(temperature, top_k, top_p, min_p, repeat_penalty, seed)
        cid, created = f"chatcmpl-{uuid.uuid4()}", int(time.time())
        parts = self._stream(tokens, max_tokens, stop, sampler)

        def chunk(delta: dict, reason: str | None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": self.model_path,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

        if stream:
            def chunks() -> Iterator[dict]:
                yield chunk({"role": "assistant"}, None)
                for text, reason, _ in parts:
                    if text:
                        yield chunk({"content": text}, None)
                    if reason:
                        yield chunk({}, reason)
            return chunks()
        text, reason, n = "", "stop", 0
        for delta, r, count in parts:
            text += delta
            reason, n = r or reason, count
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_path,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}}
