"""`npulm bench`: prompt-processing and generation speed in llama-bench's shape.

    npulm bench [-m MODEL ...] [-p 512] [-n 128] [-d 0] [-r 3] [-t 2] [-o md|json|csv] [-ngl N] [--pipeline P]

Every option that takes numbers takes a comma list; runs form the cartesian product (model x placement x threads x
test x depth). "ppN" is one prefill of N random token ids from an empty cache; "tgN" is N single-token steps from an
empty cache, feeding random token ids (sampling excluded); "@ dD" means after D context tokens, evaluated untimed
(llama-bench's -d: long-context speed). Each test runs once unrecorded (warm-up), then -r times; t/s is
the mean of the per-run rates +/- their sample standard deviation, as llama-bench reports it. JSON and CSV carry
llama-bench's field names where they apply, plus load_s (model load), load_rss_mb and peak_rss_mb (the process's
maximum resident set, MiB, after load and after the row).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import resource
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from . import assets
from .placement import add_arguments as add_placement_arguments

MD_COLUMNS = ("model", "size", "params", "backend", "threads", "test", "t/s")
CSV_FIELDS = ("model_filename", "model_type", "model_size", "model_n_params", "backends", "n_npu_layers", "pipeline",
              "npu_matmuls", "n_batch", "n_threads", "n_prompt", "n_gen", "n_depth", "speculative", "test_time",
              "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "load_s", "load_rss_mb", "peak_rss_mb")


@dataclass(frozen=True)
class Placement:
    """One NPU placement to benchmark: the Llama arguments that choose where matmuls run."""

    npu_layers: int | str = 0
    pipeline: str | None = None
    overrides: tuple[str, ...] = ()
    chip: str | None = None


def int_list(values: str | Iterable[str]) -> list[int]:
    """'512' / '128,256' / ['1', '2,4'] -> [ints]; the comma lists of llama-bench."""
    items = [values] if isinstance(values, str) else list(values)
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                if not part.lstrip("-").isdigit():
                    raise ValueError(f"expected an integer or a comma list of integers, not {item!r}")
                out.append(int(part))
    return out


def str_list(values: str | Iterable[str] | None) -> list[str]:
    items = [values] if isinstance(values, str) else list(values or [])
    return [p.strip() for item in items for p in item.split(",") if p.strip()]


def placements(npu_layers: list[str], pipelines: list[str | None], overrides: list[str],
               chip: str | None) -> list[Placement]:
    """The cartesian product of -ngl and --pipeline values; the pipeline is moot (one entry) when nothing goes to
    the NPU."""
    out: list[Placement] = []
    for ngl in npu_layers:
        layers: int | str = "all" if ngl == "all" else int(ngl)
        for pipe in pipelines if layers or overrides else [None]:
            p = Placement(layers, pipe, tuple(overrides), chip)
            if p not in out:
                out.append(p)
    return out


def peak_rss_mb() -> float:
    """This process's maximum resident set so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_desc(gguf) -> dict:
    """model_type ("llama 135M Q4_1"), model_size (tensor bytes) and model_n_params, as llama-bench names them."""
    n_params = sum(t.n_elements for t in gguf.tensors.values())
    size = sum(t.nbytes for t in gguf.tensors.values())
    label = gguf.kv.get("general.size_label") or next(f"{n_params / d:.0f}{u}" for d, u in
                                                      ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n_params >= d)
    ftype = gguf.kv.get("general.file_type")
    try:
        from gguf import LlamaFileType

        name = LlamaFileType(int(ftype)).name.removeprefix("MOSTLY_") if ftype is not None else None
    except ValueError:
        name = None
    if name is None:  # the type holding most matmul bytes
        by_type = Counter()
        for t in gguf.tensors.values():
            if len(t.shape) == 2:
                by_type[t.type.name] += t.nbytes
        name = by_type.most_common(1)[0][0] if by_type else "?"
    return {"model_type": f"{gguf.architecture} {label} {name}", "model_size": size, "model_n_params": n_params}


def backend_label(llm) -> tuple[str, str]:
    """("CPU" or "NPU:<pipelines>[emulated]", "<matmuls on the NPU>/<all>") from the loaded model's Linears."""
    where = [lin.runs_on for lin in llm.model.linears]
    npu = sorted({s.split(":", 1)[1] for s in where if s.startswith("npu:")})
    n_npu = sum(s.startswith("npu:") for s in where)
    if not npu:
        return "CPU", f"0/{len(where)}"
    emulated = llm.placement.npu.runtime.kind != "rknn"
    return "NPU:" + "+".join(npu) + ("[emulated]" if emulated else ""), f"{n_npu}/{len(where)}"


def random_tokens(rng: np.random.Generator, n: int, n_vocab: int, bos: int | None) -> list[int]:
    """Random ids as llama-bench feeds them: BOS first when the model adds one."""
    tokens = rng.integers(0, n_vocab, n).tolist()
    if bos is not None and tokens:
        tokens[0] = bos
    return tokens


def time_prompt(llm, tokens: list[int], context: list[int] = ()) -> float:
    """Seconds for one prefill of `tokens` after `context` (evaluated first, untimed: llama-bench's depth)."""
    llm.reset()
    if context:
        llm.session.eval(list(context))
    t0 = time.perf_counter()
    llm.session.eval(tokens)
    return time.perf_counter() - t0


def time_gen(llm, tokens: list[int], context: list[int] = ()) -> float:
    """Seconds for len(tokens) single-token steps after `context` (evaluated first, untimed)."""
    llm.reset()
    if context:
        llm.session.eval(list(context))
    t0 = time.perf_counter()
    for tok in tokens:
        llm.session.eval([tok])
    return time.perf_counter() - t0


def summarize(n_tokens: int, seconds: list[float]) -> dict:
    """llama-bench's statistics: mean and sample stddev of run times (ns) and of per-run rates (t/s)."""
    ns = [s * 1e9 for s in seconds]
    ts = [n_tokens / s for s in seconds]

    def sd(x: list[float]) -> float:
        return statistics.stdev(x) if len(x) > 1 else 0.0

    return {"avg_ns": int(statistics.fmean(ns)), "stddev_ns": int(sd(ns)), "avg_ts": round(statistics.fmean(ts), 6),
            "stddev_ts": round(sd(ts), 6), "samples_ns": [int(x) for x in ns], "samples_ts": [round(x, 4) for x in ts]}


def set_threads(n: int) -> None:
    """Kernel threads for the next runs (process-wide, like llama.cpp's -t)."""
    try:
        from .cpu import set_num_threads
    except ImportError:  # no compiled kernels: numpy/BLAS picks its own threads
        return
    set_num_threads(n)


def run_bench(models: Sequence[str | None], n_prompt: Sequence[int], n_gen: Sequence[int], repetitions: int = 3,
              threads: Sequence[int] = (2,), places: Sequence[Placement] = (Placement(),), n_batch: int = 512,
              seed: int = 0, progress: Callable[[str], None] | None = None, n_depth: Sequence[int] = (0,),
              draft: Any = None, draft_max: int = 16, draft_min: int = 0, draft_p_min: float = 0.75) -> list[dict]:
    """One row per (model, placement, threads, test, depth); tests are pp<n> for n in n_prompt, then tg<n> for n in
    n_gen (zeros skipped), each after `depth` context tokens (untimed, as llama-bench's -d). The model is loaded
    once per placement, with room for the longest test. With a `draft` (what Llama(draft_model=...) takes), each
    tg<n> at depth 0 gets two more rows: greedy generation after a text prompt (a news passage to copy: input-grounded
    work) plain ("tg<n> text") and speculative ("tg<n> text+<drafter>")."""
    from .api import Llama
    from .speculative import Speculator, make_speculator

    tests = [(p, 0) for p in n_prompt if p > 0] + [(0, n) for n in n_gen if n > 0]
    if not tests:
        raise ValueError("nothing to run: every -p and -n value is 0")
    if repetitions < 1:
        raise ValueError("repetitions (-r) must be >= 1")
    if any(d < 0 for d in n_depth):
        raise ValueError("depth (-d) must be >= 0")
    n_ctx = max(n_depth) + max(p for p, _ in tests) + max(n for _, n in tests) + 8 + (TEXT_PROMPT_ROOM if draft else 0)
    rows = []
    for model in models:
        path = str(assets.resolve_model(model))
        for place in places:
            t0 = time.perf_counter()
            llm = Llama(path, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads[0], verbose=False,
                        n_npu_layers=place.npu_layers, pipeline=place.pipeline,
                        tensor_overrides=list(place.overrides) or None, chip=place.chip)
            load_s = time.perf_counter() - t0
            load_rss = peak_rss_mb()
            desc = model_desc(llm.gguf)
            backend, npu_matmuls = backend_label(llm)
            bos = llm.token_bos() if llm.tokenizer.add_bos else None
            rng = np.random.default_rng(seed)
            drafter = None
            for t in threads:
                set_threads(t)
                for (p, n), d in ((test, d) for test in tests for d in n_depth):
                    name = test_name(p, n, d)
                    if progress:
                        progress(f"{desc['model_type']} {backend} t={t} {name}")
                    timer = time_prompt if p else time_gen
                    context = random_tokens(rng, d, llm.n_vocab(), bos)
                    timer(llm, random_tokens(rng, p or n, llm.n_vocab(), None if d else bos), context)  # warm-up
                    seconds = [timer(llm, random_tokens(rng, p or n, llm.n_vocab(), None if d else bos), context)
                               for _ in range(repetitions)]
                    runs = [("", seconds)]
                    if draft is not None and n and not d:
                        if drafter is None:
                            drafter = make_speculator(draft, llm.tokenizer, n_ctx, p_min=draft_p_min).drafter
                        prompt = text_prompt(llm)
                        label = f"text+{type(drafter).__name__}"
                        for tag, spec in (("text", False), (label, True)):
                            def make(spec=spec, drafter=drafter):
                                return Speculator(drafter, draft_max, draft_min) if spec else None

                            time_text_gen(llm, prompt, n, make())  # warm-up
                            runs.append((tag, [time_text_gen(llm, prompt, n, make()) for _ in range(repetitions)]))
                    for tag, secs in runs:
                        rows.append({
                            "model_filename": path, **desc, "backends": backend, "n_npu_layers": place.npu_layers,
                            "pipeline": place.pipeline or ("auto" if backend != "CPU" else ""),
                            "npu_matmuls": npu_matmuls, "n_batch": n_batch, "n_threads": t, "n_prompt": p,
                            "n_gen": n, "n_depth": d, "speculative": tag,
                            "test_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                            **summarize(p or n, secs), "load_s": round(load_s, 4),
                            "load_rss_mb": round(load_rss, 2), "peak_rss_mb": round(peak_rss_mb(), 2)})
            del llm
            gc.collect()
    return rows


def test_name(n_prompt: int, n_gen: int, n_depth: int = 0, speculative: str = "") -> str:
    """llama-bench's test label: pp512, tg128, tg128 @ d2000; tg128 text / tg128 text+PromptLookup with a draft."""
    return ((f"pp{n_prompt}" if n_prompt else f"tg{n_gen}") + (f" {speculative}" if speculative else "")
            + (f" @ d{n_depth}" if n_depth else ""))


def row_test_name(row: dict) -> str:
    return test_name(row["n_prompt"], row["n_gen"], row.get("n_depth", 0), row.get("speculative", ""))


TEXT_PROMPT_ROOM = 400  # tokens the text prompt of the speculative rows may take


def text_prompt(llm) -> list[int]:
    """An input-grounded prompt: a lee_background news passage, then the start of a verbatim copy of it."""
    words = next(ln for ln in assets.lee_background().read_text(encoding="utf-8").splitlines()
                 if len(ln.split()) > 150).split()[:150]
    tokens = llm.tokenize(f"Article:\n{' '.join(words)}\n\nThe same article, copied exactly:\n{' '.join(words[:12])}")
    return tokens[:TEXT_PROMPT_ROOM]


def time_text_gen(llm, prompt: list[int], n: int, speculator=None) -> float:
    """Seconds for n greedy tokens after `prompt` (evaluated first, untimed), plainly or with a speculator."""
    from .generate import generate
    from .sampling import make_sampler

    session = llm.session
    session.reset()
    session.prefill(prompt)
    t0 = time.perf_counter()
    for _ in generate(session, prompt, make_sampler(0), n, (), speculator):
        pass
    return time.perf_counter() - t0


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.2f} MiB"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def format_md(rows: list[dict]) -> str:
    """llama-bench's markdown table: | model | size | params | backend | threads | test | t/s |."""
    cells = [[r["model_type"], _size(r["model_size"]), _params(r["model_n_params"]), r["backends"],
              str(r["n_threads"]), row_test_name(r), f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(MD_COLUMNS)]
    right = {1, 2, 4, 5, 6}  # numbers align right, as in llama-bench

    def line(values: Iterable[str]) -> str:
        return "| " + " | ".join(v.rjust(w) if i in right else v.ljust(w)
                                 for i, (v, w) in enumerate(zip(values, widths))) + " |"

    sep = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(MD_COLUMNS), sep, *(line(c) for c in cells)]) + "\n"


def format_json(rows: list[dict]) -> str:
    return json.dumps(rows, indent=2) + "\n"


def format_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# llama-bench's, with -t 2 for a 2-core board
DEFAULTS = {"n_prompt": "512", "n_gen": "128", "threads": "2", "n_depth": "0"}
FORMATS = {"md": format_md, "json": format_json, "csv": format_csv}


def cmd_bench(args: argparse.Namespace) -> int:
    from .speculative import drafter_from_args

    models = str_list(args.model) or [None]
    places = placements(str_list(args.npu_layers) or ["0"], str_list(args.pipeline) or [None],
                        args.override_tensor or [], args.chip)

    def progress(msg: str) -> None:
        print(f"npulm bench: {msg}", file=sys.stderr, flush=True)

    rows = run_bench(models, int_list(args.n_prompt or DEFAULTS["n_prompt"]),
                     int_list(args.n_gen or DEFAULTS["n_gen"]), args.repetitions,
                     int_list(args.threads or DEFAULTS["threads"]), places, args.batch_size, args.seed,
                     progress if args.progress else None, int_list(args.n_depth or DEFAULTS["n_depth"]),
                     drafter_from_args(args), args.draft_max, args.draft_min, args.draft_p_min)
    sys.stdout.write(FORMATS[args.output](rows))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="prompt and generation speed, llama-bench style",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", action="append", default=None,
                   help=f"GGUF file or a known name ({', '.join(assets.MODELS)}); repeatable or a comma list; "
                        f"default: {assets.DEFAULT_MODEL}")
    p.add_argument("-p", "--n-prompt", action="append", default=None,
                   help="prompt tokens (comma list; 0 = no pp); default 512")
    p.add_argument("-n", "--n-gen", action="append", default=None,
                   help="generated tokens (comma list; 0 = no tg); default 128")
    p.add_argument("-d", "--n-depth", action="append", default=None,
                   help="context tokens evaluated (untimed) before each test (comma list); default 0")
    p.add_argument("-r", "--repetitions", type=int, default=3, help="timed runs per test (after one warm-up)")
    p.add_argument("-t", "--threads", action="append", default=None, help="CPU threads (comma list); default 2")
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass")
    p.add_argument("-o", "--output", choices=sorted(FORMATS), default="md", help="output format")
    add_placement_arguments(p, lists=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--progress", action="store_true", help="print each test as it starts (stderr)")
    from .speculative import add_arguments as add_speculative

    add_speculative(p)
    p.set_defaults(func=cmd_bench)
