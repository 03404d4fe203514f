"""The Python API in llama-cpp-python's shape: Llama(model_path, n_ctx=..., ...), create_completion / __call__,
create_chat_completion (OpenAI-shaped dicts, or chunks with stream=True; tools, response_format, logprobs),
create_embedding / embed, tokenize / detokenize, eval + scores, save_state / load_state.

Every llama-cpp-python keyword is implemented or refused by name (npulm/compat.py holds the table); unknown keywords
raise TypeError. `n_gpu_layers` is llama-cpp-python's name for the layers npulm puts on the NPU (n_npu_layers)."""

from __future__ import annotations

import contextlib
import copy
import sys
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import assets, compat, embeddings
from . import tools as tools_mod  # `tools` is create_chat_completion's keyword
from .generate import Session, common_prefix, stream_text
from .gguf import GGUFFile
from .models import load_model
from .models.base import hparam
from .placement import Placement, parse_overrides
from .sampling import SamplingParams, make_sampler, token_logprobs
from .speculative import make_speculator
from .vocab import load_tokenizer

LLAMA_DEFAULT_SEED = 0xFFFFFFFF  # as llama.cpp: "random"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


@dataclass
class LlamaState:
    """What save_state() captures: the tokens, the cache's contents, the logits (scores) and the seed generator."""

    input_ids: list[int]
    cache: list
    scores: np.ndarray
    seed_state: dict
    n_tokens: int = 0
    seed: int | None = None


@dataclass
class _Record:
    """The tokens a generation sampled with the logits the sampler saw, for logprobs."""

    n_top: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)

    def add(self, token: int, logits: np.ndarray) -> None:
        lp, top = token_logprobs(logits, token, self.n_top)
        self.tokens.append(token)
        self.logprobs.append(lp)
        self.top.append(top)


def _npu_present() -> bool:
    """A board: librknnrt is found, or the runtime is forced ($NPULM_NPU_RUNTIME=rknn / emulator)."""
    import os

    from .npu.device import RUNTIME_ENV
    from .npu.rknn import find_library

    return os.environ.get(RUNTIME_ENV, "auto").lower() != "auto" or find_library() is not None


class Llama:
    def __init__(self, model_path: str | None = None, *, n_ctx: int = 512, n_batch: int = 512, n_ubatch: int = 512,
                 n_threads: int | None = None, seed: int = LLAMA_DEFAULT_SEED, logits_all: bool = False,
                 verbose: bool = True, n_gpu_layers: int = 0, n_npu_layers: int | str | None = None,
                 pipeline: str | None = None, tensor_overrides: list[str] | None = None, chip: str | None = None,
                 pooling_type: int = -1, embedding: bool = False, last_n_tokens_size: int = 64,
                 chat_format: str | None = None, no_perf: bool = False, draft_model: Any = None,
                 draft_max: int = 16, draft_min: int = 0, draft_p_min: float = 0.75, **kwargs: Any):
        compat.check("Llama", compat.INIT, kwargs)
        npu_layers = self._npu_layers(n_gpu_layers, n_npu_layers)
        self.model_path = str(assets.resolve_model(model_path))
        self.verbose = verbose
        t0 = time.perf_counter()
        self.gguf = GGUFFile(self.model_path)
        self.metadata = {k: v for k, v in self.gguf.kv.items() if not isinstance(v, (list, np.ndarray))}
        self.tokenizer = load_tokenizer(self.gguf.kv)
        arch = self.gguf.architecture
        n_ctx_train = hparam(self.gguf.kv, arch, "context_length", 4096)  # type- and range-checked
        self._n_ctx = n_ctx_train if n_ctx <= 0 else n_ctx
        if n_threads:
            self.set_threads(n_threads)
        overrides = parse_overrides(tensor_overrides)
        if npu_layers == "auto":  # the cost model's plan: per tensor and phase, never predicted slower than the CPU
            from .npu.chips import chip_from_env_or_board, get_chip
            from .plan import auto_specs

            overrides += list(auto_specs(self.model_path, get_chip(chip) if chip else chip_from_env_or_board()).items())
            npu_layers = 0
        self.placement = Placement(n_layer=hparam(self.gguf.kv, arch, "block_count", 0), npu_layers=npu_layers,
                                   pipeline=pipeline, overrides=overrides, chip=chip)
        self.model = load_model(self.gguf, self._n_ctx, self.placement, progress=verbose)
        self.n_batch = max(1, min(n_batch, n_ubatch))
        self.session = Session(self.model, self.n_batch)
        self._lock, self._owner = threading.Lock(), None  # one sequence: calls from several threads are serialized
        self.logits_all = logits_all
        self.scores = np.zeros((self._n_ctx if logits_all else 1, self.model.n_vocab), np.float32)
        self._seed = None if seed == LLAMA_DEFAULT_SEED or seed < 0 else seed
        self._seed_rng = np.random.default_rng(self._seed)
        self.last_n_tokens_size = last_n_tokens_size
        self.embedding = embedding
        self._pooling = embeddings.parse_pooling(pooling_type, embeddings.declared_pooling(self.gguf.kv, arch))
        self._chat_format = chat_format
        self._chat_template = None
        if chat_format is not None:
            _ = self.chat_template  # an unknown format fails here, not at the first chat
        self._lltokenizer = self._embed_cache = None
        # speculative decoding: a PromptLookup, a draft GGUF / Llama / DraftModel, or a llama-cpp-python-style callable
        self.speculator = None if draft_model is None else make_speculator(
            draft_model, self.tokenizer, n_ctx=self._n_ctx, draft_max=draft_max, draft_min=draft_min,
            p_min=draft_p_min)
        self.load_time = time.perf_counter() - t0
        if verbose:
            print(f"npulm: loaded {self.model_path} ({arch}, {len(self.gguf.tensors)} tensors, n_ctx {self._n_ctx}, "
                  f"{self.placement.npu_layers or 0} NPU layers) in {self.load_time:.2f} s", file=sys.stderr)

    @staticmethod
    def _npu_layers(n_gpu_layers: int, n_npu_layers: int | str | None) -> int | str:
        """llama-cpp-python's n_gpu_layers (-1 = all) is npulm's n_npu_layers; give one or make them agree."""
        gpu = "all" if n_gpu_layers is not None and n_gpu_layers < 0 else int(n_gpu_layers or 0)
        if n_npu_layers is None:
            if gpu and not _npu_present():  # llama.cpp without GPU support also ignores n_gpu_layers, with a word
                warnings.warn(f"n_gpu_layers={n_gpu_layers} is ignored: no NPU runtime (librknnrt) here, the model "
                              "runs on the CPU; n_npu_layers runs NPU layers on the emulator instead", stacklevel=3)
                return 0
            return gpu
        if gpu and gpu != n_npu_layers:
            raise ValueError(f"n_gpu_layers={n_gpu_layers} and n_npu_layers={n_npu_layers!r} disagree: "
                             "n_gpu_layers is llama-cpp-python's name for n_npu_layers, give one")
        return n_npu_layers

    @classmethod
    def from_pretrained(cls, repo_id: str, filename: str | None = None, additional_files: list | None = None,
                        local_dir: str | None = None, local_dir_use_symlinks: Any = "auto",
                        cache_dir: str | None = None, **kwargs: Any) -> Llama:
        """A model by name: package-shipped models and GGUF files in npulm's cache (npulm loads no model hub)."""
        from .catalog import resolve_pretrained

        if additional_files:
            raise compat.UnsupportedArgument("from_pretrained(): additional_files (split GGUFs from a hub) are not "
                                             "supported: npulm loads no model hub")
        return cls(model_path=str(resolve_pretrained(repo_id, filename, local_dir or cache_dir)), **kwargs)

    @contextlib.contextmanager
    def _holding(self) -> Iterator[None]:
        """The model's lock: one Llama is one sequence, so calls from several threads run one after the other. A
        call from the thread whose generator is still open is an error (waiting for itself would deadlock)."""
        if self._owner == threading.get_ident():
            raise RuntimeError("this Llama is already generating in this thread (an unfinished generator or "
                               "stream): finish or close it first")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    # --- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the weights and caches; the object is unusable afterwards."""
        with self._holding():
            self.model = self.session = self._embed_cache = self._lltokenizer = None
            self.scores = np.zeros((0, 0), np.float32)

    def __enter__(self) -> Llama:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _live(self) -> Session:
        if self.session is None:
            raise RuntimeError("this Llama was closed")
        return self.session

    # --- llama-cpp-python's small accessors ------------------------------------------------------------------
    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self.model.n_vocab

    def n_embd(self) -> int:
        return hparam(self.gguf.kv, self.gguf.architecture, "embedding_length", 0)

    def token_bos(self) -> int:
        return self.tokenizer.bos_id

    def token_eos(self) -> int:
        return self.tokenizer.eos_id

    def token_nl(self) -> int:
        return self.tokenizer.encode("\n", add_bos=False)[-1]

    def pooling_type(self) -> int:
        return self._pooling

    @property
    def n_tokens(self) -> int:
        return len(self._live().tokens)

    @property
    def input_ids(self) -> np.ndarray:
        return np.asarray(self._live().tokens, dtype=np.int64)

    @property
    def eval_tokens(self) -> deque:
        return deque(self._live().tokens, maxlen=self._n_ctx)

    @property
    def eval_logits(self) -> deque:
        rows = self.scores[:self.n_tokens] if self.logits_all else self.scores[:1]
        return deque((r.tolist() for r in rows), maxlen=self._n_ctx if self.logits_all else 1)

    @staticmethod
    def set_threads(n: int) -> None:
        from .cpu import set_num_threads  # without compiled kernels this is a no-op: BLAS picks its threads

        set_num_threads(n)

    def set_seed(self, seed: int) -> None:
        """Seed for calls that give none (llama-cpp-python's set_seed)."""
        self._seed = seed
        self._seed_rng = np.random.default_rng(None if seed < 0 or seed == LLAMA_DEFAULT_SEED else seed)

    def set_cache(self, cache: Any) -> None:
        raise compat.UnsupportedArgument(f"set_cache(): {compat.METHODS['set_cache'][1]}")

    @staticmethod
    def logits_to_logprobs(logits: np.ndarray | list, axis: int = -1) -> np.ndarray:
        return log_softmax(np.moveaxis(np.asarray(logits), axis, -1)).swapaxes(-1, axis)

    @staticmethod
    def longest_token_prefix(a: Sequence[int], b: Sequence[int]) -> int:
        return common_prefix(a, b)

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
        with self._holding():
            self._live().reset()

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate tokens after those already in the context; logits land in self.scores (all rows if
        logits_all, else the last in scores[0])."""
        with self._holding():
            n0 = self.n_tokens
            logits = self._live().eval(tokens, logits_from=0 if self.logits_all else -1)
        if self.logits_all:
            self.scores[n0:n0 + len(tokens)] = logits
        else:
            self.scores[0] = logits[-1]

    def save_state(self) -> LlamaState:
        """A copy of the sequence: tokens, the cache's contents, the scores and the seed generator's state."""
        with self._holding():
            s = self._live()
            cache = [tuple(a.copy() for a in layer.state) if hasattr(layer, "set_state") else copy.deepcopy(layer)
                     for layer in s.cache]
            rng = copy.deepcopy(self._seed_rng.bit_generator.state)
            return LlamaState(list(s.tokens), cache, self.scores.copy(), rng, len(s.tokens), self._seed)

    def load_state(self, state: LlamaState) -> None:
        with self._holding():
            s = self._live()
            if len(state.cache) != len(s.cache) or state.scores.shape != self.scores.shape:
                raise ValueError("load_state: the state was saved from a model or context of another shape")
            for i, saved in enumerate(state.cache):
                if isinstance(saved, tuple):
                    s.cache[i].set_state(*saved)
                else:
                    s.cache[i] = copy.deepcopy(saved)
            s.tokens = list(state.input_ids)
            self.scores[...] = state.scores
            self._seed_rng.bit_generator.state = copy.deepcopy(state.seed_state)
            self._seed = state.seed

    # --- sampling --------------------------------------------------------------------------------------------
    def _lltok(self):
        if self._lltokenizer is None:  # built once per model: a few seconds on a 262k vocabulary
            from .grammar import make_lltokenizer

            self._lltokenizer = make_lltokenizer(self.tokenizer, self.model.n_vocab)
        return self._lltokenizer

    def _sampler(self, sampling: dict, grammar: str | None = None, record: _Record | None = None,
                 logits_processor: Sequence[Callable] | None = None,
                 stopping_criteria: Sequence[Callable] | None = None):
        """The sampler chain for one call; wrapped to apply logits processors, record logprobs (from exactly the
        logits the chain sees) and honour stopping criteria (the token that meets one is the last)."""
        self._live()
        seed = sampling.pop("seed", None)
        if seed is None or seed < 0:
            seed = int(self._seed_rng.integers(0, 2**31 - 1))
        sp = SamplingParams(seed=seed, repeat_last_n=self.last_n_tokens_size, **sampling).check(self.model.n_vocab)
        constraint = None
        if grammar is not None:
            from .grammar import GrammarConstraint

            constraint = GrammarConstraint(self._lltok(), grammar)
        inner = make_sampler(sp, constraint=constraint)
        if not (record or logits_processor or stopping_criteria):
            return inner
        stop_id = min(self.tokenizer.eog_ids) if self.tokenizer.eog_ids else self.tokenizer.eos_id
        stopped = False

        def sample(logits: np.ndarray, history: Sequence[int]) -> int:
            nonlocal stopped
            if stopped:
                return stop_id
            ids = np.asarray(history, dtype=np.int64)
            for proc in logits_processor or ():
                logits = np.asarray(proc(ids, logits.copy()), dtype=np.float32)
            token = inner(logits, history)
            if record is not None:
                record.add(token, logits)
            if stopping_criteria and any(c(np.append(ids, token), logits) for c in stopping_criteria):
                stopped = True
            return token

        return sample

    def sample(self, top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, typical_p: float = 1.0,
               temp: float = 0.80, repeat_penalty: float = 1.0, frequency_penalty: float = 0.0,
               presence_penalty: float = 0.0, tfs_z: float = 1.0, mirostat_mode: int = 0, mirostat_eta: float = 0.1,
               mirostat_tau: float = 5.0, penalize_nl: bool = True, logits_processor: Any = None,
               grammar: Any = None, idx: int | None = None) -> int:
        """One token from the last evaluated logits (scores), with the completions' sampler chain."""
        compat.check("sample", compat.COMPLETION, {"tfs_z": tfs_z})
        from .grammar import as_grammar

        row = (self.n_tokens - 1 if idx is None else idx) if self.logits_all else 0
        s = self._sampler(dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                               repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                               presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
                               mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=self._seed),
                          as_grammar(grammar), logits_processor=logits_processor)
        return s(self.scores[row], self._live().tokens)

    def generate(self, tokens: Sequence[int], top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05,
                 typical_p: float = 1.0, temp: float = 0.80, repeat_penalty: float = 1.0, reset: bool = True,
                 frequency_penalty: float = 0.0, presence_penalty: float = 0.0, tfs_z: float = 1.0,
                 mirostat_mode: int = 0, mirostat_tau: float = 5.0, mirostat_eta: float = 0.1,
                 penalize_nl: bool = True, logits_processor: Any = None, stopping_criteria: Any = None,
                 grammar: Any = None) -> Iterator[int]:
        """Tokens after `tokens`, without end (the caller stops; end-of-generation tokens are yielded too)."""
        compat.check("generate", compat.COMPLETION, {"tfs_z": tfs_z})
        from .grammar import as_grammar

        s = self._sampler(dict(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p, typical_p=typical_p,
                               repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                               presence_penalty=presence_penalty, mirostat_mode=mirostat_mode,
                               mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, seed=self._seed),
                          as_grammar(grammar), logits_processor=logits_processor)
        with self._holding():
            session = self._live()
            if reset:
                session.reset()
            logits = session.prefill(list(tokens)) if tokens else session.eval([self.token_bos()])[-1]
            while True:
                token = s(logits, session.tokens)
                if stopping_criteria and any(c(np.asarray(session.tokens + [token]), logits)
                                             for c in stopping_criteria):
                    return
                yield token
                logits = session.eval([token])[-1]

    def _stream(self, prompt_tokens: list[int], max_tokens: int | None, stop: str | list[str] | None,
                sampler) -> Iterator[tuple[str, str | None, int]]:
        """(text delta, finish_reason or None, completion token count), holding the model's lock throughout: one
        Llama is one sequence, so concurrent calls run one after the other."""
        with self._holding():
            yield from stream_text(self._live(), self.tokenizer, prompt_tokens, sampler, max_tokens, stop,
                                   self.speculator)

    # --- completion ------------------------------------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        return self.tokenizer.token_to_bytes(token, special=True).decode("utf-8", errors="replace")

    def _completion_logprobs(self, rec: _Record, start: int, stop: int, offset: int) -> dict:
        """OpenAI completions' logprobs for recorded tokens start..stop, text offsets counted from `offset`."""
        out: dict[str, list] = {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
        for i in range(start, stop):
            text = self._token_text(rec.tokens[i])
            out["tokens"].append(text)
            out["text_offset"].append(offset)
            offset += len(text)
            out["token_logprobs"].append(rec.logprobs[i])
            out["top_logprobs"].append({self._token_text(t): lp for t, lp in rec.top[i]} or None)
        return out

    def create_completion(self, prompt: str | list[int], suffix: str | None = None, max_tokens: int | None = 16,
                          temperature: float = 0.8, top_p: float = 0.95, min_p: float = 0.05,
                          typical_p: float = 1.0, logprobs: int | None = None, echo: bool = False,
                          stop: str | list[str] | None = None, frequency_penalty: float = 0.0,
                          presence_penalty: float = 0.0, repeat_penalty: float = 1.0, top_k: int = 40,
                          stream: bool = False, seed: int | None = None, mirostat_mode: int = 0,
                          mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                          stopping_criteria: Sequence[Callable] | None = None,
                          logits_processor: Sequence[Callable] | None = None, grammar: Any = None,
                          logit_bias: dict | None = None, dry_multiplier: float = 0.0, dry_base: float = 1.75,
                          dry_allowed_length: int = 2, dry_penalty_last_n: int = 64,
                          **kwargs: Any) -> dict | Iterator[dict]:
        """OpenAI-shaped completion (llama-cpp-python's keywords; DRY is npulm's addition, as llama-server's)."""
        compat.check("create_completion", compat.COMPLETION, {"suffix": suffix, **kwargs})
        from .grammar import as_grammar

        tokens = prompt if isinstance(prompt, list) else self.tokenize(prompt)
        if not tokens:
            tokens = [self.token_bos()]
        if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or logprobs < 0):
            raise ValueError(f"logprobs must be a count >= 0, got {logprobs!r}")
        rec = _Record(logprobs) if logprobs is not None else None
        sampler = self._sampler(self._sampling_args(locals()), as_grammar(grammar), rec, logits_processor,
                                stopping_criteria)
        cid, created, name = f"cmpl-{uuid.uuid4()}", int(time.time()), model or self.model_path
        head = "" if not echo else prompt if isinstance(prompt, str) else \
            self.detokenize(tokens).decode("utf-8", errors="replace")

        def chunk(text: str, reason: str | None, lp: dict | None = None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": name,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": reason}]}

        parts = self._stream(tokens, max_tokens, stop, sampler)
        if stream:
            def chunks() -> Iterator[dict]:
                done, offset = 0, len(head)
                if head:
                    yield chunk(head, None)
                for text, reason, n in parts:
                    if text or reason:
                        lp = self._completion_logprobs(rec, done, len(rec.tokens), offset) if rec else None
                        done, offset = (len(rec.tokens) if rec else n), offset + len(text)
                        yield chunk(text, reason, lp)
            return chunks()
        text, reason, n = head, "stop", 0
        for delta, r, count in parts:
            text += delta
            reason, n = r or reason, count
        out = chunk(text, reason, self._completion_logprobs(rec, 0, len(rec.tokens), len(head)) if rec else None)
        out["usage"] = {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}
        return out

    __call__ = create_completion

    @staticmethod
    def _sampling_args(args: dict) -> dict:
        names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "frequency_penalty",
                 "presence_penalty", "mirostat_mode", "mirostat_tau", "mirostat_eta", "seed", "logit_bias",
                 "dry_multiplier", "dry_base", "dry_allowed_length", "dry_penalty_last_n")
        return {k: args[k] for k in names}

    # --- chat ------------------------------------------------------------------------------------------------
    @property
    def chat_template(self):
        if self._chat_template is None:
            from .chat import CHATML_TEMPLATE, GEMMA_TEMPLATE, ChatTemplate

            fmt, kv = self._chat_format, self.gguf.kv
            if fmt is None or fmt in ChatTemplate.names_in_gguf(kv):
                self._chat_template = ChatTemplate.from_gguf(kv, fmt)
            else:
                known = {"chatml": CHATML_TEMPLATE, "chatml-function-calling": CHATML_TEMPLATE,
                         "gemma": GEMMA_TEMPLATE, **compat.CHAT_FORMATS}
                if fmt not in known:
                    raise compat.UnsupportedArgument(
                        f"chat_format={fmt!r} is not supported by npulm: use a template the GGUF carries "
                        f"({', '.join(ChatTemplate.names_in_gguf(kv)) or 'none'}) or one of {', '.join(known)}")
                base = ChatTemplate.from_gguf(kv)
                self._chat_template = ChatTemplate(known[fmt], base.bos_token, base.eos_token, fmt)
        return self._chat_template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kw: Any) -> list[int]:
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kw)
        tokens = self.tokenizer.encode(text, add_bos=False, special=True)
        bos = self.tokenizer.bos_id
        if self.tokenizer.add_bos and bos is not None and (not tokens or tokens[0] != bos):
            tokens.insert(0, bos)
        return tokens

    def _chat_logprobs(self, rec: _Record, start: int, stop: int) -> dict:
        def entry(t: int, lp: float) -> dict:
            text = self._token_text(t)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**entry(rec.tokens[i], rec.logprobs[i]),
                             "top_logprobs": [entry(t, lp) for t, lp in rec.top[i]]} for i in range(start, stop)]}

    def create_chat_completion(self, messages: list[dict], functions: list[dict] | None = None,
                               function_call: Any = None, tools: list[dict] | None = None, tool_choice: Any = None,
                               temperature: float = 0.2, top_p: float = 0.95, top_k: int = 40, min_p: float = 0.05,
                               typical_p: float = 1.0, stream: bool = False, stop: str | list[str] | None = None,
                               seed: int | None = None, response_format: dict | None = None,
                               max_tokens: int | None = None, presence_penalty: float = 0.0,
                               frequency_penalty: float = 0.0, repeat_penalty: float = 1.0, mirostat_mode: int = 0,
                               mirostat_tau: float = 5.0, mirostat_eta: float = 0.1, model: str | None = None,
                               logits_processor: Sequence[Callable] | None = None, grammar: Any = None,
                               logit_bias: dict | None = None, logprobs: bool | None = None,
                               top_logprobs: int | None = None, dry_multiplier: float = 0.0, dry_base: float = 1.75,
                               dry_allowed_length: int = 2, dry_penalty_last_n: int = 64,
                               **kwargs: Any) -> dict | Iterator[dict]:
        """OpenAI-shaped chat completion through the GGUF's chat template, with tools and structured output."""
        compat.check("create_chat_completion", compat.CHAT, kwargs)
        from .grammar import as_grammar, response_format_grammar

        use = tools_mod.ToolUse(messages, tools, tool_choice, self.chat_template.source, functions, function_call)
        tokens = use.prompt(self.apply_chat_template)
        grammars = [g for g in (as_grammar(grammar), response_format_grammar(response_format), use.grammar)
                    if g is not None]
        if len(grammars) > 1:
            raise ValueError("give one of grammar, response_format and a required / named tool_choice")
        if top_logprobs is not None and not 0 <= top_logprobs <= 20:
            raise ValueError(f"top_logprobs must be in [0, 20], got {top_logprobs!r}")
        rec = _Record(top_logprobs or 0) if logprobs else None
        sampler = self._sampler(self._sampling_args(locals()), grammars[0] if grammars else None, rec,
                                logits_processor)
        cid, created, name = f"chatcmpl-{uuid.uuid4()}", int(time.time()), model or self.model_path
        parts = self._stream(tokens, max_tokens, stop, sampler)

        def chunk(delta: dict, reason: str | None, lp: dict | None = None) -> dict:
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": reason}]}

        if stream:
            def chunks() -> Iterator[dict]:
                yield chunk({"role": "assistant"}, None)
                held, holding, done = "", use.calling, 0
                for text, reason, _ in parts:
                    lp = self._chat_logprobs(rec, done, len(rec.tokens)) if rec and not holding else None
                    if holding:  # a reply that may be a tool call waits for the end
                        held += text
                        holding = tools_mod.may_start_call(held)
                        text, held = (held, "") if not holding else ("", held)
                    if rec and lp is not None:
                        done = len(rec.tokens)
                    if text:
                        yield chunk({"content": text}, None, lp)
                    if reason:
                        if held:
                            delta, reason = use.call_delta(held, reason)
                            yield chunk(delta, None, self._chat_logprobs(rec, done, len(rec.tokens)) if rec else None)
                        yield chunk({}, reason)
            return chunks()
        text, reason, n = "", "stop", 0
        for delta, r, count in parts:
            text += delta
            reason, n = r or reason, count
        msg, reason = use.message(text, reason)
        return {"id": cid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": msg,
                             "logprobs": self._chat_logprobs(rec, 0, len(rec.tokens)) if rec else None,
                             "finish_reason": reason}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": n, "total_tokens": len(tokens) + n}}

    # --- embeddings --------------------------------------------------------------------------------------------
    def embed(self, input: str | list[str], normalize: bool = False, truncate: bool = True,
              return_count: bool = False, *, pooling: int | str | None = None) -> Any:
        """Embeddings of a text or texts: one vector each, pooled as the GGUF declares (or pooling_type / pooling:
        "mean", "cls", "last"; "none" gives one vector per token)."""
        pooling_id = embeddings.parse_pooling(pooling, self._pooling)
        texts = [input] if isinstance(input, str) else list(input)
        token_lists = []
        for text in texts:
            toks = self.tokenize(text)
            if len(toks) > self.n_batch:
                if not truncate:
                    raise ValueError(f"Requested tokens ({len(toks)}) exceed batch size of {self.n_batch}")
                toks = toks[:self.n_batch]
            token_lists.append(toks)
        with self._holding():
            if self._embed_cache is None:
                self._live()
                self._embed_cache = self.model.make_cache()
            vecs = embeddings.embed_tokens(self.model, self._embed_cache, token_lists, pooling_id, normalize)
        data = [v.tolist() for v in vecs]
        out = data[0] if isinstance(input, str) else data
        return (out, sum(map(len, token_lists))) if return_count else out

    def create_embedding(self, input: str | list[str], model: str | None = None, *,
                         pooling: int | str | None = None, normalize: bool = True) -> dict:
        """OpenAI-shaped embeddings (unit vectors unless normalize=False)."""
        data, n = self.embed([input] if isinstance(input, str) else input, normalize=normalize, return_count=True,
                             pooling=pooling)
        return {"object": "list", "model": model or self.model_path,
                "data": [{"object": "embedding", "embedding": e, "index": i} for i, e in enumerate(data)],
                "usage": {"prompt_tokens": n, "total_tokens": n}}


