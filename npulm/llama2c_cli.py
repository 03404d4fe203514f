"""`npulm run` for llama2.c checkpoints, in two dialects:

  npulm run model.bin [-t temp] [-p topp] [-s seed] [-n steps] [-i prompt] [-z tokenizer] [-m generate|chat] [-y sys]
      llama2.c's own `run` flags, meaning what they mean there (a checkpoint first, as `./run model.bin ...`);
  npulm run -m model.bin -z tokenizer.bin -p "Once upon a time" -n 256 [--temp T] [--top-p P] [-s seed] [-t threads]
      npulm's (llama.cpp's) names: -m the model, -p the prompt, plus -z and --mode from llama2.c.

Every matmul, the classifier included, runs W16A16 on the NPU by default (the emulator without a board); --cpu keeps
them on the CPU. Sampling is run.c's (xorshift RNG, temperature then top-p), so a seed gives run.c's choices where
the logits agree. The prompt is prefilled in one pass (one NPU call per matmul for all its tokens).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from .llama2c import Llama2cError, Llama2cTokenizer, is_checkpoint, load_model, to_gguf
from .placement import Placement


def wants(argv: list[str]) -> bool:
    """Whether `npulm run` arguments name a llama2.c checkpoint (positionally or with -m / --model)."""
    if not argv:
        return False
    if not argv[0].startswith("-"):
        return True
    for flag in ("-m", "--model"):
        if flag in argv[:-1] and is_checkpoint(argv[argv.index(flag) + 1]):
            return True
    return False


def parse(argv: list[str]) -> argparse.Namespace:
    llama2c = not argv[0].startswith("-")
    ap = argparse.ArgumentParser(prog="npulm run", description="Run a llama2.c checkpoint (model.bin).")
    if llama2c:  # ./run model.bin [options]
        ap.add_argument("checkpoint")
        ap.add_argument("-t", dest="temperature", type=float, default=1.0, help="temperature (0 = greedy)")
        ap.add_argument("-p", dest="topp", type=float, default=0.9, help="top-p (1 = off)")
        ap.add_argument("-i", dest="prompt", default="", help="input prompt")
        ap.add_argument("-m", dest="mode", choices=("generate", "chat"), default="generate")
        ap.add_argument("--threads", type=int, default=None, help="CPU threads")
    else:
        ap.add_argument("-m", "--model", dest="checkpoint", required=True)
        ap.add_argument("--temp", dest="temperature", type=float, default=1.0, help="temperature (0 = greedy)")
        ap.add_argument("--top-p", dest="topp", type=float, default=0.9, help="top-p (1 = off)")
        ap.add_argument("-p", "--prompt", "-i", dest="prompt", default="", help="input prompt")
        ap.add_argument("--mode", choices=("generate", "chat"), default="generate")
        ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads")
    ap.add_argument("-n", dest="steps", type=int, default=256, help="positions to run, prompt included (0 = seq_len)")
    ap.add_argument("-s", "--seed", dest="seed", type=int, default=0, help="RNG seed (0 = the time)")
    ap.add_argument("-z", dest="tokenizer", default=None, help="tokenizer.bin (default: next to the checkpoint)")
    ap.add_argument("-y", dest="system", default=None, help="system prompt (chat mode)")
    ap.add_argument("--cpu", action="store_true", help="every matmul on the CPU instead of the NPU")
    ap.add_argument("--pipeline", default="W16A16", help="NPU pipeline of every matmul (default W16A16)")
    ap.add_argument("--chip", default=None, help="NPU chip (rk3588, rk3576, ...); detected on a board")
    ap.add_argument("--export-gguf", metavar="OUT", default=None,
                    help="write the checkpoint and tokenizer as a GGUF llama file and exit")
    return ap.parse_args(argv)


def tokenizer_path(args: argparse.Namespace) -> Path:
    return Path(args.tokenizer) if args.tokenizer else Path(args.checkpoint).with_name("tokenizer.bin")


class Sampler:
    """run.c's sampler: argmax at temperature 0, else softmax(logits / T), then multinomial or top-p, with its
    xorshift64* generator (so a seed draws the same coins as run.c)."""

    def __init__(self, temperature: float, topp: float, seed: int):
        self.temperature, self.topp = temperature, topp
        self.state = (seed or int(time.time())) & 0xFFFFFFFFFFFFFFFF

    def random_f32(self) -> float:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & 0xFFFFFFFFFFFFFFFF
        s ^= s >> 27
        self.state = s
        u32 = ((s * 0x2545F4914F6CDD1D) & 0xFFFFFFFFFFFFFFFF) >> 32
        return (u32 >> 8) / 16777216.0

    def __call__(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        x = logits.astype(np.float32) / np.float32(self.temperature)
        p = np.exp(x - x.max())
        p /= p.sum()
        coin = self.random_f32()
        if self.topp <= 0 or self.topp >= 1:
            i = int(np.searchsorted(np.cumsum(p), coin, side="right"))
            return min(i, len(p) - 1)
        cutoff = (1.0 - self.topp) / (len(p) - 1)  # tokens below can never be in the nucleus
        idx = np.flatnonzero(p >= cutoff)
        idx = idx[np.argsort(-p[idx], kind="stable")]
        cum = np.cumsum(p[idx])
        last = min(int(np.searchsorted(cum, self.topp, side="right")), len(idx) - 1)
        r = coin * cum[last]
        return int(idx[min(int(np.searchsorted(cum[:last + 1], r, side="right")), last)])


class Runner:
    def __init__(self, args: argparse.Namespace):
        ckpt, tok = Path(args.checkpoint), tokenizer_path(args)
        if args.threads:
            from . import cpu

            cpu.set_num_threads(args.threads)
        placement = Placement() if args.cpu else Placement(default=f"npu:{args.pipeline}", chip=args.chip)
        self.model = load_model(ckpt, 0, placement)
        if not tok.exists():
            raise FileNotFoundError(f"tokenizer {tok} not found (give it with -z)")
        self.tokenizer = Llama2cTokenizer(tok, self.model.n_vocab)
        n_ctx = self.model.n_ctx
        self.steps = n_ctx if args.steps <= 0 or args.steps > n_ctx else args.steps
        self.sampler = Sampler(args.temperature, args.topp, args.seed)
        self.out = sys.stdout.buffer

    def _emit(self, prev: int, token: int) -> None:
        piece = self.tokenizer.piece(prev, token)
        if len(piece) == 1 and not (32 <= piece[0] < 127 or piece[0] in b"\t\n\v\f\r"):
            return  # run.c's safe_printf: a lone byte prints only if C's isprint or isspace
        self.out.write(piece)
        self.out.flush()

    def generate(self, prompt: str) -> int:
        tokens = self.tokenizer.encode(prompt, bos=True)
        if len(tokens) > self.steps:
            raise ValueError(f"the prompt is {len(tokens)} tokens, more than the {self.steps} steps (-n)")
        cache = self.model.make_cache()
        # the prompt in one pass: its pieces are printed as run.c prints them, then sampling starts
        logits = self.model.forward(tokens, cache)[-1]
        for prev, token in zip(tokens, tokens[1:]):
            self._emit(prev, token)
        pos, token, t0 = len(tokens), tokens[-1], time.perf_counter()
        n_generated = 0
        while pos < self.steps:
            nxt = self.sampler(logits)
            if nxt == Llama2cTokenizer.BOS:  # run.c: BOS delimits sequences
                break
            self._emit(token, nxt)
            token, pos, n_generated = nxt, pos + 1, n_generated + 1
            if pos < self.steps:
                logits = self.model.forward([token], cache)[-1]
        self.out.write(b"\n")
        self.out.flush()
        dt = time.perf_counter() - t0
        if n_generated > 1:
            print(f"achieved tok/s: {n_generated / dt:f}", file=sys.stderr)
        return 0

    def chat(self, prompt: str, system: str | None) -> int:
        """run.c's chat: Llama-2 [INST] turns; the assistant speaks until EOS."""
        cache, pos, first = self.model.make_cache(), 0, True
        while pos < self.steps:
            if first and system is None:
                system = input("Enter system prompt (optional): ")
            user = prompt if first and prompt else input("User: ")
            text = (f"[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST]" if first and system
                    else f"[INST] {user} [/INST]")
            first = False
            tokens = self.tokenizer.encode(text, bos=True)
            if pos + len(tokens) >= self.steps:
                break
            logits = self.model.forward(tokens, cache)[-1]
            pos += len(tokens)
            token = tokens[-1]
            self.out.write(b"Assistant: ")
            while pos < self.steps:
                nxt = self.sampler(logits)
                if nxt == Llama2cTokenizer.EOS:
                    break
                self._emit(token, nxt)
                token = nxt
                logits = self.model.forward([token], cache)[-1]
                pos += 1
            self.out.write(b"\n")
            self.out.flush()
        return 0


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        if args.export_gguf:
            print(to_gguf(args.checkpoint, tokenizer_path(args), args.export_gguf))
            return 0
        runner = Runner(args)
        if args.mode == "chat":
            return runner.chat(args.prompt, args.system)
        return runner.generate(args.prompt)
    except (Llama2cError, ValueError, FileNotFoundError) as e:
        print(f"npulm: error: {e}", file=sys.stderr)
        return 1
    except EOFError:  # the chat's input ended
        return 0
    except KeyboardInterrupt:
        return 130
