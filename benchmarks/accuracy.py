"""Accuracy of every NPU pipeline on real models, on the emulator: regenerates docs/accuracy.md and docs/accuracy.png.

    python benchmarks/accuracy.py                  # both models, every pipeline, 8 chunks (about half an hour)
    python benchmarks/accuracy.py --chunks 2 --models smollm2-135m --pipelines W16A16,W8A16_HADAMARD
    python benchmarks/accuracy.py --render         # docs/accuracy.md and .png again from the measurements kept in
                                                   # docs/accuracy.json, speed columns from today's cost model

For SmolLM2-135M (Q4_1) and Gemma-3-270M (Q4_K_M) on lee_background (-c 512, 8 chunks, llama-perplexity's method:
the second half of each chunk scored): perplexity, mean KL divergence against the model's dequantized float32 CPU
reference ("cpu-ref" for every tensor), and top-1 agreement with it, for the CPU paths and for every pipeline with
every linear weight of every block on the NPU (emulated RK3588). The output matmul stays on "cpu-ref" in the NPU
rows, so they measure the pipelines alone. For SmolLM2 also: how many of 10 prompts give the same 32 greedy tokens
as the CPU path with --npu-layers all (the output matmul on the NPU too) and the default pipeline for quantized
types (pipelines.BEST_QUANTIZED). The plot puts each pipeline's accuracy against its predicted RK3588 speed.
"""

from __future__ import annotations

import os

# The emulator runs many small sgemms; OpenBLAS's threads cost more than they give on a 2-core machine for those.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from npulm import Llama, assets  # noqa: E402
from npulm.evaluate import Divergence, log_softmax  # noqa: E402
from npulm.evaluate import divergence as _divergence  # noqa: E402
from npulm.npu import pipelines as P  # noqa: E402
from npulm.npu.chips import get_chip  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
MODELS = (assets.SMOLLM2, assets.GEMMA3)
N_CTX = 512
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, you first",
    "The largest planet in the solar system",
    "In 1969, astronauts landed on",
    "A good night's sleep is important because",
    "The recipe calls for two cups of flour and",
    "Python is a programming language that",
    "The river flowed quietly through the",
]
TARGETS = {  # ΔPPL and mean KLD vs the CPU path (W16A16: vs cpu-ref)
    "W16A16": "ΔPPL within ±0.05 % of the CPU reference",
    "best 8-bit weights": "ΔPPL <= +0.1 %, KLD vs cpu <= 0.002",
    "best 4-bit weights": "ΔPPL <= +5 %",
    "best pure W4A4": "ΔPPL <= +30 %",
}


@dataclasses.dataclass
class Row:
    name: str
    kind: str  # "cpu" | "anchor" | "npulm" | "variant"
    npu: str
    ppl: float
    kld: float
    top1: float
    seconds: float  # per chunk
    kld_cpu: float = 0.0  # mean KL(cpu || row): against npulm's CPU path of the same GGUF


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def evaluate(path: str, n_chunks: int, label: str, **kw) -> tuple[np.ndarray, np.ndarray, float, Llama]:
    """Logits of the scored positions of n_chunks chunks, their targets, seconds per chunk."""
    llm = Llama(path, n_ctx=N_CTX, verbose=False, **kw)
    text = assets.lee_background().read_text(encoding="utf-8", errors="replace")
    tokens = llm.tokenize(text, add_bos=True)
    bos = llm.token_bos() if llm.tokenizer.add_bos else None
    first = N_CTX // 2
    logits, targets = [], []
    t0 = time.perf_counter()
    for i in range(n_chunks):
        chunk = list(tokens[i * N_CTX:(i + 1) * N_CTX])
        if bos is not None:
            chunk[0] = bos
        llm.reset()
        logits.append(llm.session.eval(chunk, logits_from=first)[: N_CTX - 1 - first])
        targets.append(np.asarray(chunk[first + 1:]))
        say(f"  {label}: chunk {i + 1}/{n_chunks} ({time.perf_counter() - t0:.0f} s)")
    return _to_disk(logits, label), np.concatenate(targets), (time.perf_counter() - t0) / n_chunks, llm


_SPILL = tempfile.TemporaryDirectory(prefix="npulm-accuracy-")  # a 262k vocabulary: 2 GB of logits per row


def _to_disk(chunks: list[np.ndarray], label: str) -> np.ndarray:
    """The logits as a float32 memmap on disk: three models' worth of Gemma-3 logits do not fit in RAM with
    the log-softmax temporaries; everything below reads them a block of rows at a time."""
    n, v = sum(len(c) for c in chunks), chunks[0].shape[1]
    out = np.lib.format.open_memmap(Path(_SPILL.name) / f"{label}-{time.monotonic_ns()}.npy", mode="w+",
                                    dtype=np.float32, shape=(n, v))
    at = 0
    for c in chunks:
        out[at: at + len(c)] = c
        at += len(c)
    chunks.clear()
    return out


def _drop(a: np.ndarray) -> None:
    if isinstance(a, np.memmap) and a.filename:
        os.remove(a.filename)


def divergence(ref: np.ndarray, logits: np.ndarray, step: int = 128) -> Divergence:
    parts = [_divergence(np.asarray(ref[i: i + step]), np.asarray(logits[i: i + step]))
             for i in range(0, len(ref), step)]
    return Divergence(np.concatenate([p.kl for p in parts]), np.concatenate([p.top1 for p in parts]))


def perplexity(logits: np.ndarray, targets: np.ndarray, step: int = 128) -> float:
    nll = []
    for i in range(0, len(targets), step):
        lp = log_softmax(np.asarray(logits[i: i + step]))
        nll.append(-lp[np.arange(len(lp)), targets[i: i + step]])
    return float(np.exp(np.concatenate(nll).mean()))


def npu_description(llm: Llama) -> str:
    """The NPU realization of the block linears, per GGUF type when they differ (e.g. Q4_K vs Q5_0 codes)."""
    by_text: dict[str, list[str]] = {}
    for lin in llm.model.linears:
        if lin.runs_on.startswith("npu:"):
            text = lin.describe().split(": ", 1)[-1].split(", K ")[0]
            types = by_text.setdefault(text, [])
            if lin.type.name not in types:
                types.append(lin.type.name)
    if not by_text:
        return "CPU fallback"
    if len(by_text) == 1:
        return next(iter(by_text))
    return "; ".join(f"{'/'.join(t)}: {text}" for text, t in by_text.items())


def run_model(model: str, pipelines: list[str], n_chunks: int) -> tuple[list[Row], dict]:
    path = str(assets.model_path(model))
    say(f"{model}: {path}")
    ref, targets, secs, llm = evaluate(path, n_chunks, "cpu-ref", tensor_overrides=["*=cpu-ref"])
    n_layer = len(llm.model.blocks)
    del llm
    rows = [Row("cpu-ref", "cpu", "float32 (dequantized weights, BLAS)", perplexity(ref, targets), 0.0, 1.0, secs)]
    lg, _, secs, llm = evaluate(path, n_chunks, "cpu")
    del llm
    cpu_logits = lg
    d = divergence(ref, lg)
    rows.append(Row("cpu", "cpu", "GGUF blocks in place, x int8 per 32 (llama.cpp's scheme; a16 for some roles)",
                    perplexity(lg, targets), d.mean_kl, d.top1_rate, secs))
    for name in pipelines:
        spec = P.PIPELINES[name]
        kind = "anchor" if spec.origin == "rk-llama.cpp" else (spec.origin or "variant")
        lg, _, secs, llm = evaluate(path, n_chunks, name, n_npu_layers=n_layer, pipeline=name,
                                    tensor_overrides=["output.weight=cpu-ref", "token_embd.weight=cpu-ref"])
        npu = npu_description(llm)
        del llm
        d = divergence(ref, lg)
        rows.append(Row(name, kind, npu, perplexity(lg, targets), d.mean_kl, d.top1_rate, secs,
                        divergence(cpu_logits, lg).mean_kl))
        _drop(lg)
        r = rows[-1]
        say(f"  -> {name}: PPL {r.ppl:.4f} ({100 * (r.ppl / rows[1].ppl - 1):+.2f} % vs cpu), KLD {r.kld:.5f}, "
            f"KLD vs cpu {r.kld_cpu:.5f}, top-1 {100 * r.top1:.1f} %")
    _drop(ref)
    _drop(cpu_logits)
    return rows, {"n_layer": n_layer, "tokens": len(targets)}


def continuations(model: str, pipeline: str, n_tokens: int = 32) -> dict:
    """Greedy continuations of PROMPTS on the CPU path, the float reference and the NPU (--npu-layers all)."""
    path = str(assets.model_path(model))
    runs = {"cpu": {}, "cpu-ref": {"tensor_overrides": ["*=cpu-ref"]},
            "npu": {"n_npu_layers": "all", "pipeline": pipeline}}
    texts: dict[str, list[str]] = {}
    for label, kw in runs.items():
        llm = Llama(path, n_ctx=256, verbose=False, **kw)
        texts[label] = [llm.create_completion(p, max_tokens=n_tokens, temperature=0)["choices"][0]["text"]
                        for p in PROMPTS]
        say(f"  continuations: {label} done")
        del llm

    def same(a: str, b: str) -> int:
        return sum(x == y for x, y in zip(texts[a], texts[b]))

    return {"pipeline": pipeline, "npu_cpu": same("npu", "cpu"), "npu_ref": same("npu", "cpu-ref"),
            "cpu_ref": same("cpu", "cpu-ref"), "samples": list(zip(PROMPTS, texts["cpu"], texts["npu"]))}


def best(rows: list[Row], pred) -> Row | None:
    cands = [r for r in rows if pred(r)]
    return min(cands, key=lambda r: r.kld_cpu) if cands else None


def markdown(results: dict[str, tuple[list[Row], dict]], conts: dict, n_chunks: int, elapsed: float) -> str:
    out = ["# NPU pipeline accuracy", "",
           f"Generated by `python benchmarks/accuracy.py` on {datetime.date.today().isoformat()} in "
           f"{elapsed / 60:.0f} min, on the **emulator** of the RKNPU2 matmul API (rk3588 rules; integer products "
           "exact, fp16 products summed in float32): the numbers a board gives if the hardware matches the emulator's "
           "documented assumptions (`npulm doctor` checks them on a board).", "",
           f"Method: lee_background.cor, -c {N_CTX}, {n_chunks} chunks, llama-perplexity's scoring (second half of "
           "each chunk). KLD = mean KL(cpu-ref ‖ row) over the scored tokens, top-1 = argmax agreement with cpu-ref. "
           "`cpu-ref` = every weight dequantized to float32 (the reference); `cpu` = npulm's CPU path (GGUF blocks "
           "in place, x quantized to int8 per 32 like llama.cpp). NPU rows: every linear weight of every block on "
           "the NPU through the pipeline (`--npu-layers <n_layer> --pipeline NAME`); the output matmul stays on "
           "`cpu-ref`, so the rows measure the pipelines alone. ΔPPL is relative to the `cpu` row (the CPU path "
           "of the same GGUF); the Δ vs cpu-ref column is relative to the float reference.", "",
           "Speed columns: `npulm plan`'s prediction for RK3588 (docs/cost-model.md; every block linear on the NPU, "
           "the output matmul on the CPU): NPU bytes per parameter incl. padding, decode rknn_matmul_run calls per "
           "token, pp512 and tg128 in tok/s and against the CPU. The plot (accuracy.png) puts each pipeline's KLD "
           "and ΔPPL against the CPU path next to its predicted pp512 and tg128 against the CPU's.", "",
           "Kinds: **anchor** = rk-llama.cpp's recipes (the prior art; its W16A16 is the plain fp16 path), **npulm** "
           "= pipelines of our own, variant = intermediate recipes. The dotted line in the plot is KLD 0.002.", "",
           "Every pipeline makes one NPU call per core per K-chunk, chunks as wide as the chip allows. With ~16-bit x "
           "(W8A16_*: x's int8 codes and its residual's int8 codes, two rows of one call) what is left of the error "
           "is the weights' requantization to int8 per output channel; `python benchmarks/quant_sim.py "
           "--weight-error` prints it per channel and per group, with and without rotation. Finer weight scales, "
           "and the GGUF's own exact codes with their scale per 32 inputs, need one partial sum per group: more "
           "calls, or A rows expanded per group (the four GGUF-block pipelines this table had made 6,480-14,040 "
           "calls per SmolLM2 token). 4-bit weights requantized from the GGUF stay near 10 % weight error even "
           "per 32 inputs, hence the W4 rows.", ""]
    for model, (rows, meta) in results.items():
        cpu, ref = rows[1], rows[0]
        speed = predicted(model)
        out += [f"## {model} ({meta['n_layer']} blocks, {meta['tokens']} scored tokens)", "",
                "| pipeline | kind | NPU realization (RK3588) | PPL | ΔPPL vs cpu | ΔPPL vs cpu-ref | mean KLD | "
                "KLD vs cpu | top-1 % | NPU B/param | calls/token | pred. pp512 | pred. tg128 | s / chunk |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            sp = speed.get(r.name if r.kind != "cpu" else "cpu")
            cols = "- | - | - | -"
            if sp:
                cols = (f"{sp['npu_bytes_per_param']:.3f} | {sp['calls_per_token']} | {sp['pp_tok_s']:.0f} "
                        f"({sp['pp_vs_cpu']:.2f}x) | {sp['tg_tok_s']:.1f} ({sp['tg_vs_cpu']:.2f}x)")
            out.append(f"| {r.name} | {r.kind} | {r.npu} | {r.ppl:.4f} | {100 * (r.ppl / cpu.ppl - 1):+.2f} % | "
                       f"{100 * (r.ppl / ref.ppl - 1):+.2f} % | {_kld(r.kld)} | "
                       f"{_kld(r.kld_cpu) if r.kind != 'cpu' else '-'} | {100 * r.top1:.1f} | {cols} | "
                       f"{r.seconds:.1f} |")
        npu_rows = [r for r in rows if r.kind != "cpu"]
        w8 = best(npu_rows, lambda r: r.name.startswith("W8"))
        w4 = best(npu_rows, lambda r: r.name.startswith("W4"))
        a4 = best(npu_rows, lambda r: r.name.startswith("W4A4"))
        w16 = next((r for r in npu_rows if r.name == "W16A16"), None)
        out += ["", "Targets:", ""]
        for label, r in (("W16A16", w16), ("best 8-bit weights", w8), ("best 4-bit weights", w4),
                         ("best pure W4A4", a4)):
            if r is None:
                continue
            base = ref if label == "W16A16" else cpu
            out.append(f"- {label} ({TARGETS[label]}): **{r.name}** ΔPPL {100 * (r.ppl / base.ppl - 1):+.2f} % "
                       f"vs {'cpu-ref' if label == 'W16A16' else 'cpu'}, KLD {_kld(r.kld)} vs cpu-ref, "
                       f"{_kld(r.kld_cpu)} vs cpu")
        out.append("")
        if model in conts:
            c = conts[model]
            out += [f"### Greedy continuations: {c['npu_cpu']}/10 prompts give the CPU path's 32 tokens", "",
                    f"`--npu-layers all --pipeline {c['pipeline']}` (every linear, the output matmul too, on the "
                    f"NPU), temperature 0, 32 tokens. The same NPU run matches the float32 reference (cpu-ref) on "
                    f"{c['npu_ref']}/10 prompts; for scale, the CPU path itself matches cpu-ref on {c['cpu_ref']}/10: "
                    "greedy decoding of a 135M model parts at near-ties, whichever side rounds differently.", "",
                    "| prompt | CPU path | NPU |", "|---|---|---|"]
            for prompt, a, b in c["samples"][:5]:
                out.append(f"| {prompt} | {_md(a)} | {_md(b)} |")
            out.append("")
    out += ["## The pipelines", "", P.table_markdown(get_chip("rk3588")), "",
            "![PPL and KLD per pipeline](accuracy.png)", ""]
    return "\n".join(out)


TABLE = Path(__file__).resolve().parent.parent / "npulm" / "npu" / "accuracy_measured.py"


def write_table(results: dict[str, tuple[list[Row], dict]], path: Path = TABLE) -> None:
    """The measured accuracy per (pipeline, model) as the Python table `npulm plan` budgets with."""
    lines = []
    for model, (rows, _) in results.items():
        for r in rows:
            if r.kind != "cpu":
                lines.append(f"    ({r.name!r}, {model!r}): ({100 * (r.ppl / rows[1].ppl - 1):+.3f}, {r.kld:.3e}, "
                             f"{r.kld_cpu:.3e}, {r.top1:.4f}),")
    path.write_text(f'''"""Measured accuracy of the NPU pipelines (every block linear on the NPU, emulated
RK3588), written by `python benchmarks/accuracy.py` on {datetime.date.today().isoformat()} (lee_background,
-c {N_CTX}, llama-perplexity's scoring). What `npulm plan` budgets with: nothing in the planner guesses an accuracy.
"""

# (pipeline, model): (ΔPPL % vs the CPU path, mean KLD vs the float32 reference, mean KLD vs the CPU path, top-1)
MEASURED: dict[tuple[str, str], tuple[float, float, float, float]] = {{
{chr(10).join(lines)}
}}
''')


def predicted(model: str) -> dict[str, dict]:
    """`npulm plan`'s rows for the model on RK3588 (the cost model): NPU bytes/param, calls per token, pp512, tg128."""
    from npulm.npu.chips import get_chip
    from npulm.npu.cost import ModelShape
    from npulm.plan import Planner

    rows = Planner(ModelShape.from_gguf(assets.model_path(model)), get_chip("rk3588")).rows(512, 128)
    return {r["name"]: r for r in rows}


def _kld(v: float) -> str:
    return f"{v:.5f}" if v >= 1e-4 or v == 0 else f"{v:.1e}"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ⏎ ").strip()


def plot(results: dict[str, tuple[list[Row], dict]], path: Path) -> None:
    """Per model: KLD and ΔPPL against the CPU path (y) vs predicted RK3588 pp512 and tg128 against the CPU (x),
    one point per pipeline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"anchor": "#d62728", "npulm": "#2ca02c", "variant": "#1f77b4"}
    fig, axes = plt.subplots(len(results), 3, figsize=(18, 5.5 * len(results)), squeeze=False)
    for row, (model, (rows, _)) in zip(axes, results.items()):
        speed, cpu = predicted(model), rows[1]
        pts = [(r, speed[r.name]) for r in rows if r.kind != "cpu" and r.name in speed]
        for ax, (x_key, y_of, y_label) in zip(row, (
                ("pp_vs_cpu", lambda r: max(r.kld_cpu, 1e-6), "mean KLD vs the CPU path (log)"),
                ("tg_vs_cpu", lambda r: max(r.kld_cpu, 1e-6), "mean KLD vs the CPU path (log)"),
                ("pp_vs_cpu", lambda r, c=cpu: 100 * (r.ppl / c.ppl - 1), "ΔPPL vs the CPU path, % (symlog)"))):
            for r, sp in pts:
                ax.scatter(sp[x_key], y_of(r), color=colors.get(r.kind, "#1f77b4"), s=40)
                ax.annotate(r.name, (sp[x_key], y_of(r)), fontsize=7, xytext=(4, 3), textcoords="offset points")
            ax.set_xscale("log")
            if y_label.startswith("mean KLD"):
                ax.set_yscale("log")
                ax.axhline(0.002, color="k", ls=":", lw=1)
            else:
                ax.set_yscale("symlog", linthresh=0.1)
                ax.axhline(0.1, color="k", ls=":", lw=1)
            ax.axvline(1.0, color="#777777", ls="--", lw=1)
            phase = "pp512" if x_key == "pp_vs_cpu" else "tg128"
            ax.set_xlabel(f"predicted RK3588 {phase}, x the CPU's (log; dashed: the CPU)")
            ax.set_ylabel(y_label)
            ax.set_title(f"{model}: accuracy vs predicted {phase}")
    handles = [plt.Line2D([], [], marker="o", ls="", color=c) for c in colors.values()]
    fig.legend(handles, ["anchor (rk-llama.cpp)", "npulm", "variant"], loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)


def save_results(path: Path, results: dict[str, tuple[list[Row], dict]], conts: dict, n_chunks: int,
                 elapsed: float) -> None:
    """The measurements (not the predictions) as JSON, so that the doc can be rendered again (`--render`)."""
    data = {"date": datetime.date.today().isoformat(), "n_chunks": n_chunks, "minutes": elapsed / 60,
            "models": {m: {"meta": meta, "rows": [dataclasses.asdict(r) for r in rows]}
                       for m, (rows, meta) in results.items()},
            "continuations": conts}
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def load_results(path: Path) -> tuple[dict[str, tuple[list[Row], dict]], dict, int, float]:
    data = json.loads(path.read_text())
    results = {m: ([Row(**r) for r in v["rows"]], v["meta"]) for m, v in data["models"].items()}
    return results, data["continuations"], data["n_chunks"], data["minutes"] * 60


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--pipelines", default=",".join(P.PIPELINES))
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--no-continuations", action="store_true")
    ap.add_argument("--out", default=str(DOCS), help="directory for accuracy.md and accuracy.png")
    ap.add_argument("--table", action="store_true", help="also rewrite npulm/npu/accuracy_measured.py (the plan's "
                                                         "accuracy table)")
    ap.add_argument("--render", action="store_true", help="no measuring: accuracy.md / .png from the measurements "
                                                          "in accuracy.json (the speed columns are recomputed)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = Path(args.out)
    if args.render:
        results, conts, n_chunks, elapsed = load_results(out / "accuracy.json")
    else:
        pipelines = [P.pipeline_spec(p).name for p in args.pipelines.split(",") if p]
        results, conts = {}, {}
        for model in args.models.split(","):
            results[model] = run_model(model, pipelines, args.chunks)
            if model == assets.SMOLLM2 and not args.no_continuations:
                say(f"{model}: greedy continuations")
                conts[model] = continuations(model, P.BEST_QUANTIZED)
        n_chunks, elapsed = args.chunks, time.perf_counter() - t0
        out.mkdir(parents=True, exist_ok=True)
        save_results(out / "accuracy.json", results, conts, n_chunks, elapsed)
    (out / "accuracy.md").write_text(markdown(results, conts, n_chunks, elapsed))
    if args.table:
        write_table(results)
    plot(results, out / "accuracy.png")
    say(f"wrote {out / 'accuracy.md'} and {out / 'accuracy.png'} in {(time.perf_counter() - t0) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
