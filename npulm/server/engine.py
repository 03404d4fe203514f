"""Continuous batching: N slots share one model; one engine thread runs steps in which every active slot
contributes its rows (a decoding slot: its last token; at most one prefilling slot: one chunk of its prompt) to ONE
`model.forward_batch` pass, so every Linear sees M = all those rows. Requests join at step boundaries; each slot owns
its cache, its tokens and its seeded sampler, so a request gets the tokens it would get alone.

A finished slot keeps its cache: a new request takes the free slot holding the longest prefix of its prompt and
evaluates only the rest (a chat's next turn does not re-prefill the history).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..generate import TextStream, common_prefix
from ..models.base import Model
from ..models.cache import cache_offset
from ..sampling import Sampler, token_logprobs
from ..tokenizer import Tokenizer

log = logging.getLogger("npulm.server")


class QueueFull(RuntimeError):
    """More requests waiting than the server queues."""


class EngineStopped(RuntimeError):
    """The engine thread is not running (shutting down, or it died)."""


@dataclass
class TokenEvent:
    """One generated token: the text it completes (may be "" while UTF-8 or a possible stop string is held back)
    and, when asked, its log-probability and the top alternatives [(token, logprob)]."""
    token: int
    text: str
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    reason: str  # "stop" | "length" | "cancelled"
    text: str  # what the stream held back until the end
    n_prompt: int
    n_cached: int  # prompt tokens reused from a slot's cache
    n_gen: int
    t_prompt: float  # seconds from admission to the first token
    t_gen: float  # seconds from the first token to the end
    tokens: list[int] = field(default_factory=list)  # the generated tokens


@dataclass
class ErrorEvent:
    error: BaseException


@dataclass
class GenRequest:
    """What the engine needs to generate for one client; results arrive on `events` (an asyncio queue of the
    caller's loop, fed thread-safely)."""
    prompt: list[int]
    sampler: Sampler
    max_tokens: int | None = None  # None: until an end-of-generation token or a full context
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's and the k most likely
    ignore_eos: bool = False  # llama-server's: end-of-generation tokens do not end the reply (benchmarks)
    events: asyncio.Queue | None = None
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False
    t_submit: float = 0.0

    def cancel(self) -> None:
        """Called from the client's side (disconnect, stop button): the engine frees the slot at its next step."""
        self.cancelled = True

    def emit(self, event: Any) -> None:
        if self.events is None or self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's loop is closed: nobody listens any more
            self.cancelled = True


class Slot:
    """One sequence of the batch. It has what a `Speculator` needs of a session (model, cache, tokens, n_ctx)."""

    def __init__(self, index: int, model: Model, speculator: Any = None):
        self.index, self.model, self.speculator = index, model, speculator
        self.cache = model.make_cache()
        self.tokens: list[int] = []  # exactly what the cache holds
        self.req: GenRequest | None = None
        self.pending: list[int] = []  # prompt tokens still to evaluate
        self.next_token: int | None = None  # sampled, to evaluate in the next step
        self.text: TextStream | None = None
        self.generated: list[int] = []
        self.n_gen = self.n_cached = 0
        self.t_admit = self.t_first = 0.0
        self.last_used = 0.0

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    def truncate(self, n: int) -> None:
        for layer in self.cache:
            layer.trim(layer.offset - n)
        del self.tokens[min(n, cache_offset(self.cache)):]  # a recurrent state (RWKV) forgets all it cannot step back

    def release(self) -> None:
        self.req, self.pending, self.next_token, self.text = None, [], None, None
        self.last_used = time.monotonic()


def cpu_rows_kernel_bound() -> int:
    """M below which the CPU kernels use their rows algorithm (whose rows do not depend on each other)."""
    from ..cpu import _kernels

    return _kernels.get_gemm_min_m() if _kernels is not None else 1


@contextlib.contextmanager
def rows_kernel(m: int):
    """Run a pass of m rows on the CPU kernels' rows algorithm, as each row runs alone (the gemm algorithm, chosen
    from M = 8 by default, sums in another order: greedy replies could differ from a lone run's at near-ties). The
    threshold is process-wide: only the engine thread runs the model, and it is restored after the pass."""
    from ..cpu import _kernels

    default = _kernels.get_gemm_min_m() if _kernels is not None else m + 1
    if default > m:
        yield
        return
    _kernels.set_gemm_min_m(m + 1)
    try:
        yield
    finally:
        _kernels.set_gemm_min_m(default)


class Engine:
    """The slots and the thread that steps them. `submit()` is thread-safe; the engine thread is the only one that
    touches the model and the caches."""

    def __init__(self, model: Model, tokenizer: Tokenizer, n_slots: int = 1, n_chunk: int = 128,
                 max_queue: int = 64, prefix_cache: bool = True, same_rows_below: int | None = None,
                 exact_decode: bool = True, speculator: Callable[[], Any] | None = None):
        self.model, self.tokenizer = model, tokenizer
        # speculator: makes each slot's npulm.speculative.Speculator (prompt lookup): a decoding slot's row then
        # carries its drafts, verified in the same pass as the other slots' rows
        self.slots = [Slot(i, model, speculator() if speculator else None) for i in range(max(1, n_slots))]
        self.n_chunk, self.max_queue, self.prefix_cache = max(1, n_chunk), max_queue, prefix_cache
        # passes of fewer rows than this compute each row as it is computed alone (the CPU kernels' rows algorithm);
        # a prompt chunk joins the decode rows only below it, so greedy replies are the same batched or alone
        if same_rows_below is None:  # row-exact Linears (the packed CPU kernels): a prompt chunk may always join
            same_rows_below = model.n_ctx + 1 if all(lin.row_exact for lin in model.linears) else \
                cpu_rows_kernel_bound()
        self.same_rows_below = same_rows_below
        self.exact_decode = exact_decode  # decode passes on the rows kernel whatever their M (see rows_kernel)
        self.queue: collections.deque[GenRequest] = collections.deque()
        self.jobs: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self.cond = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None
        # counters for /metrics (read from other threads; ints and a deque are safe to read without the lock)
        self.prefix_hits = self.prefix_tokens = 0
        self.n_prompt_eval = self.n_generated = 0
        self.recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens generated)

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds (all slots together)."""
        now = time.monotonic()
        recent = [n for t, n in list(self.recent) if t >= now - window]
        return sum(recent) / window

    @property
    def n_ctx(self) -> int:
        return self.model.n_ctx

    @property
    def busy(self) -> int:
        return sum(s.req is not None for s in self.slots)

    @property
    def queued(self) -> int:
        return len(self.queue)

    # --- client side -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self.thread = threading.Thread(target=self._run, name="npulm-engine", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.running = False
            self.cond.notify_all()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def submit(self, req: GenRequest) -> None:
        if not req.prompt:
            raise ValueError("empty prompt")
        with self.cond:
            if not self.running:
                raise EngineStopped("the engine is not running")
            if len(self.queue) >= self.max_queue:
                raise QueueFull(f"{len(self.queue)} requests already queued (the server queues {self.max_queue})")
            req.t_submit = time.monotonic()
            self.queue.append(req)
            self.cond.notify()

    def run_job(self, fn: Callable[[], Any]) -> Future:
        """Run fn on the engine thread between two steps (other work on the model, e.g. embeddings: the engine
        thread is the only one that runs the model)."""
        future: Future = Future()
        with self.cond:
            if not self.running:
                raise EngineStopped("the engine is not running")
            if len(self.jobs) >= self.max_queue:
                raise QueueFull(f"{len(self.jobs)} jobs already queued (the server queues {self.max_queue})")
            self.jobs.append((fn, future))
            self.cond.notify()
        return future

    # --- engine thread ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self.cond:
                    while self.running and not self.queue and not self.jobs and not any(s.req for s in self.slots):
                        self.cond.wait()
                    if not self.running:
                        break
                    self._admit()
                    jobs, self.jobs = list(self.jobs), collections.deque()
                for fn, future in jobs:
                    if future.set_running_or_notify_cancel():
                        try:
                            future.set_result(fn())
                        except Exception as e:
                            future.set_exception(e)
                self._step()
        except BaseException as e:  # a bug in a step: every client gets the error, nobody hangs
            log.exception("engine stopped")
            self._fail_all(e)
            self.running = False
            raise
        self._fail_all(EngineStopped("the server is shutting down"))

    def _fail_all(self, error: BaseException) -> None:
        with self.cond:
            waiting, self.queue = list(self.queue), collections.deque()
            jobs, self.jobs = list(self.jobs), collections.deque()
        for _, future in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(error)
        for slot in self.slots:
            if slot.req is not None:
                slot.req.emit(ErrorEvent(error))
                slot.truncate(0)
                slot.release()
        for req in waiting:
            req.emit(ErrorEvent(error))

    def _admit(self) -> None:
        """Queued requests into free slots: the slot holding the longest prefix of the prompt, else the least
        recently used."""
        while self.queue:
            free = [s for s in self.slots if s.req is None]
            if not free:
                return
            req = self.queue.popleft()
            if req.cancelled:
                continue
            # the last prompt token is always evaluated: its logits start the reply
            reuse = [min(common_prefix(s.tokens, req.prompt), len(req.prompt) - 1) if self.prefix_cache else 0
                     for s in free]
            keep, _, slot = max(zip(reuse, [-s.last_used for s in free], free), key=lambda x: x[:2])
            slot.truncate(keep)
            keep = len(slot.tokens)
            if keep:
                self.prefix_hits += 1
                self.prefix_tokens += keep
            slot.req, slot.pending, slot.next_token = req, list(req.prompt[keep:]), None
            slot.text = TextStream(self.tokenizer, req.stop)
            slot.n_gen, slot.n_cached, slot.generated = 0, keep, []
            slot.t_admit, slot.t_first = time.monotonic(), 0.0

    def _step(self) -> None:
        """One step: every decoding slot's last token, and the next chunk of at most one prefilling slot."""
        decode: list[Slot] = []
        prefill: Slot | None = None
        for slot in self.slots:
            req = slot.req
            if req is None:
                continue
            if req.cancelled:
                self._finish(slot, "cancelled")
            elif not slot.pending:
                decode.append(slot)
            elif prefill is None:  # one prompt chunk per step: the others wait at most one chunk
                prefill = slot
        drafts = {s.index: s.speculator.propose(s, s.next_token, s.req.sampler) for s in decode if s.speculator}
        rows = [[s.next_token, *(drafts[s.index].tokens if s.index in drafts else ())] for s in decode]
        n_rows = sum(map(len, rows))
        chunk = prefill.pending[:self.n_chunk] if prefill is not None else []
        if chunk and n_rows + len(chunk) < self.same_rows_below and n_rows == len(rows):
            self._pass([*decode, prefill], [*rows, chunk])
        else:  # a row's result must not depend on the rows beside it: kernels that switch algorithm at some M
            if decode:
                with rows_kernel(n_rows) if self.exact_decode else contextlib.nullcontext():
                    self._pass(decode, rows, drafts)
            if chunk:
                self._pass([prefill], [chunk])

    def _pass(self, batch: list[Slot], rows: list[list[int]], drafts: dict | None = None) -> None:
        drafted = any(d.tokens for d in (drafts or {}).values())
        t0 = time.perf_counter()
        try:  # with drafts, every row's logits (a decode pass: each slot's rows are its token and its drafts)
            outs = self.model.forward_batch(rows, [s.cache for s in batch], 0 if drafted else -1)
        except Exception as e:  # a failing pass (e.g. the NPU refused a call) fails this batch's requests only
            log.exception("forward pass failed")
            for slot in batch:
                slot.req.emit(ErrorEvent(e))
                slot.truncate(0)  # some layers may hold the rows: start this slot over
                slot.release()
            return
        seconds, n_rows = time.perf_counter() - t0, sum(map(len, rows))
        n_gen = 0
        for slot, row, logits in zip(batch, rows, outs):
            slot.tokens.extend(row)
            if slot.pending:
                self.n_prompt_eval += len(row)
                del slot.pending[:len(row)]
                if slot.pending:
                    continue
            draft = drafts.get(slot.index) if drafts else None
            if draft is None:
                n_gen += self._sample(slot, logits[-1])
            else:  # a speculating slot, with or without drafts this step; its share of the pass by its rows
                n_gen += self._verify(slot, row, logits, draft, seconds * len(row) / n_rows)
        self.n_generated += n_gen
        now = time.monotonic()
        self.recent.append((now, n_gen))
        while self.recent and self.recent[0][0] < now - 60:
            self.recent.popleft()

    def _verify(self, slot: Slot, row: list[int], logits: np.ndarray, draft: Any, seconds: float) -> int:
        """A slot's token and drafts went through the pass: keep the agreed drafts (the target sampler's own draws,
        as npulm.speculative.verify), roll the cache back past the rest, emit each kept token in order. The pass time
        is charged to the slot by its share of the rows (on the CPU, rows cost about alike)."""
        from ..speculative import settle

        n0 = len(slot.tokens) - len(row)  # row[0] (the last emitted token) sits at n0
        out = settle(slot, n0, logits, draft, slot.req.sampler)  # the last emitted is not in the cache
        slot.speculator.record(draft, len(out), seconds)
        n = 0
        for i, token in enumerate(out):
            n += self._emit(slot, token, logits[i], n0 + 1 + i)
            if slot.req is None:  # finished (end of generation, stop string, max_tokens, context): the rest is dropped
                break
        return n

    def _sample(self, slot: Slot, logits: np.ndarray) -> int:
        return self._emit(slot, slot.req.sampler(logits, slot.tokens), logits)

    def _emit(self, slot: Slot, token: int, logits: np.ndarray, held: int | None = None) -> int:
        """A sampled token to the client (or the end of the reply); 1 if it counts as generated. held: the tokens
        the sequence holds before this one (a verified draft's position; default: what the cache holds)."""
        req = slot.req
        if slot.t_first == 0.0:
            slot.t_first = time.monotonic()
        if token in self.tokenizer.eog_ids and not req.ignore_eos:
            self._finish(slot, "stop")
            return 0
        slot.n_gen += 1
        slot.generated.append(token)
        text = slot.text.feed(token)
        event = TokenEvent(token, text)
        if req.logprobs is not None:
            event.logprob, event.top = token_logprobs(logits, token, req.logprobs)
        req.emit(event)
        if slot.text.hit:
            self._finish(slot, "stop", flush=False)
        elif req.max_tokens is not None and slot.n_gen >= req.max_tokens:
            self._finish(slot, "length")
        elif (len(slot.tokens) if held is None else held) >= self.n_ctx:
            self._finish(slot, "length")
        else:
            slot.next_token = token
        return 1

    def _finish(self, slot: Slot, reason: str, flush: bool = True) -> None:
        req = slot.req
        now = time.monotonic()
        first = slot.t_first or now
        tail = slot.text.flush() if flush and slot.text is not None else ""
        req.emit(DoneEvent(reason, tail, len(req.prompt), slot.n_cached, slot.n_gen, first - slot.t_admit,
                           now - first, slot.generated))
        slot.release()
