"""What each NPU quantization recipe costs on a real model, measured with the float64 references of npulm.npu.simulate.

    python benchmarks/quant_sim.py                    # matmul errors on real + synthetic activations (~2 min)
    python benchmarks/quant_sim.py --wht              # also time the Walsh-Hadamard transform variants
    python benchmarks/quant_sim.py --ppl-chunks 2     # also perplexity / KL vs float per recipe (slow: ~1 min/chunk)
    python benchmarks/quant_sim.py --weight-error     # also the weights' requantization error, int8 / int4 grids

Sections:
  1. GGUF-exact codes: every linear weight's codes dequantized vs gguf.quants.dequantize (equal float32 values),
     and how far float32 scale/offset parameters evaluated in float32 would drift.
  2. Matmul relative error ||y - x W^T|| / ||x W^T|| per recipe, W = the GGUF weight dequantized, x = the real
     inputs of every linear captured from a forward pass over lee_background, and synthetic N(0, 1) rows with a few
     outlier channels.
  3. (--weight-error) ||W_q - W|| / ||W|| over the block linears when the GGUF weight is requantized: int8 / int4,
     per channel (absmax or MSE clip) or per group of g inputs (which needs one partial sum per group: g-wide
     K-chunks or row-expanded A), without rotation, after the block Hadamard, after the padded one.
  4. (--ppl-chunks) the model run with every block linear replaced by the recipe's simulation: PPL (llama-perplexity
     method, -c 512), mean KL(float || recipe) and top-1 agreement over the scored tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections import defaultdict

import numpy as np

from npulm import assets
from npulm.gguf import GGUFFile
from npulm.linear import Linear, Weight
from npulm.npu import pipelines as P
from npulm.npu import quant as qm
from npulm.npu import simulate as S
from npulm.placement import Placement


def prepare_shared(name: str, weight: Weight, cache: dict) -> S.PreparedWeight:
    """S.prepare, reusing the weight of another pipeline that quantizes it the same way (W4A4/W4A8_CHANNEL)."""
    r = P.PIPELINES[name]
    key = (r.weights, r.weight_bits, r.rotation)
    if key not in cache:
        cache[key] = S.prepare(r, weight)
    return dataclasses.replace(cache[key], pipeline=r)


class SimLinear(Linear):
    """A linear whose output is the float reference, or the simulation of `SimLinear.recipe`; can record inputs."""

    runs_on = "qsim"
    recipe: str | None = None
    captured: dict[str, np.ndarray] | None = None
    fallbacks: set[str] = set()

    def __init__(self, weight: Weight):
        super().__init__(weight)
        self.weight = weight
        self.w = weight.dequantize()
        self.prepared: dict[str, S.PreparedWeight | None] = {}
        self.shared: dict = {}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if SimLinear.captured is not None:
            SimLinear.captured[self.name] = x.copy()
        r = SimLinear.recipe
        if r is None:
            return x @ self.w.T
        if r not in self.prepared:
            self.prepared.clear()  # one recipe at a time: bounded memory
            try:
                self.prepared[r] = prepare_shared(r, self.weight, self.shared)
            except ValueError:  # e.g. int4-only recipe on an 8-bit GGUF type: stays float
                self.prepared[r] = None
                SimLinear.fallbacks.add(f"{r}:{self.weight.type.name}")
        pw = self.prepared[r]
        return x @ self.w.T if pw is None else S.simulate_prepared(pw, x).astype(np.float32)


class SimPlacement(Placement):
    """The blocks' weights as SimLinear, the rest on the CPU."""

    def build(self, weight: Weight, spec=None) -> Linear:
        return SimLinear(weight) if weight.name.startswith("blk.") else super().build(weight, spec)


def linear_weights(g: GGUFFile, layer_step: int = 1) -> list[Weight]:
    """The 2-D weights of every `layer_step`-th block."""
    return [Weight.from_gguf(g, n) for n, t in g.tensors.items()
            if n.startswith("blk.") and len(t.shape) == 2 and int(n.split(".")[1]) % layer_step == 0]


def section_gguf_exact(weights: list[Weight]) -> None:
    print("\n## 1. GGUF-exact codes\n")
    by_type: dict[str, list] = defaultdict(lambda: [0, 0, 0, 0.0, 0])
    for w in weights:
        gc = qm.gguf_codes(w)
        ref = w.dequantize()
        s = by_type[w.type.name]
        s[0] += 1
        s[1] += int(np.array_equal(gc.dequantize(), ref))
        # the same parameters held in float32 and evaluated in float32 (what a float32 CPU epilogue would do)
        g = gc.scale.shape[1]
        v32 = qm._grouped(gc.codes.astype(np.float32), g) * gc.scale.astype(np.float32)[:, :, None]
        if gc.offset is not None:
            v32 = v32 + gc.offset.astype(np.float32)[:, :, None]
        v32 = v32.reshape(ref.shape)
        ulp = np.abs(v32.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
        ulp[(v32 == ref)] = 0
        s[2] += int((ulp > 0).sum())
        s[3] = max(s[3], float(ulp.max()))
        s[4] = max(s[4], gc.bits)
    print("| type | tensors | exact (float64 params) | float32-params values off | max ulps off | code bits |")
    print("|---|---|---|---|---|---|")
    for t, (n, ok, off, mx, bits) in by_type.items():
        print(f"| {t} | {n} | {ok}/{n} | {off} | {mx:.0f} | {bits} |")


def capture_activations(g: GGUFFile, n_tokens: int) -> dict[str, np.ndarray]:
    from npulm.models import load_model
    from npulm.tokenizer import Tokenizer

    model = load_model(g, n_tokens, SimPlacement())
    tok = Tokenizer.from_gguf(g.kv)
    tokens = tok.encode(assets.lee_background().read_text(encoding="utf-8"))[:n_tokens]
    SimLinear.captured, SimLinear.recipe = {}, None
    model.forward(tokens, model.make_cache())
    captured, SimLinear.captured = SimLinear.captured, None
    return captured


def synthetic_activations(m: int, k: int, seed: int) -> np.ndarray:
    """N(0, 1) rows with 4 channels x 25: crest factor ~16, like the measured q/k/v inputs of SmolLM2."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k))
    x[:, rng.choice(k, 4, replace=False)] *= 25.0
    return x


def crest(x: np.ndarray) -> float:
    return float(np.median(np.abs(x).max(axis=1) / np.sqrt((x * x).mean(axis=1))))


def section_matmul(weights: list[Weight], acts: dict[str, np.ndarray], recipes: list[str]) -> None:
    blocks = sorted({int(w.name.split(".")[1]) for w in weights})
    print(f"\n## 2. Matmul relative error, {len(weights)} linear weights of blocks {blocks}\n")
    kinds = sorted({w.name.split(".")[2] for w in weights})
    err: dict[tuple[str, str], list[float]] = defaultdict(list)  # (source, recipe) -> per-tensor errors
    kind_err: dict[tuple[str, str], list[float]] = defaultdict(list)  # (recipe, kind), real activations
    crests = defaultdict(list)
    t0 = time.perf_counter()
    for i, w in enumerate(weights):
        wf = w.dequantize().astype(np.float64)
        xs = {"real": acts[w.name].astype(np.float64), "synthetic": synthetic_activations(64, w.n_in, i)}
        refs = {src: x @ wf.T for src, x in xs.items()}
        crests[w.name.split(".")[2]].append(crest(xs["real"]))
        shared: dict = {}
        for name in recipes:
            try:
                pw = prepare_shared(name, w, shared)
            except ValueError:
                continue
            for src, x in xs.items():
                e = qm.relative_error(S.simulate_prepared(pw, x), refs[src])
                err[(src, name)].append(e)
                if src == "real":
                    kind_err[(name, w.name.split(".")[2])].append(e)
    print(f"(simulated in {time.perf_counter() - t0:.0f} s; median crest factor of the real inputs: "
          + ", ".join(f"{k} {np.median(v):.1f}" for k, v in crests.items()) + ")\n")
    print("| recipe | real x: mean | real x: max | synthetic x: mean | " + " | ".join(kinds) + " |")
    print("|---|---|---|---|" + "---|" * len(kinds))
    for name in recipes:
        r, s = err[("real", name)], err[("synthetic", name)]
        if not r:
            print(f"| {name} | n/a | | | " + " | " * len(kinds))
            continue
        per_kind = " | ".join(f"{np.mean(kind_err[(name, k)]):.4f}" for k in kinds)
        print(f"| {name} | {np.mean(r):.4f} | {np.max(r):.4f} | {np.mean(s):.4f} | {per_kind} |")
    print("\n(per-kind columns: mean over the layers, real activations)")


def section_ppl(g: GGUFFile, recipes: list[str], n_chunks: int) -> None:
    from npulm.evaluate import divergence, log_softmax
    from npulm.models import load_model
    from npulm.tokenizer import Tokenizer

    n_ctx, first = 512, 256
    model = load_model(g, n_ctx, SimPlacement())
    tok = Tokenizer.from_gguf(g.kv)
    tokens = tok.encode(assets.lee_background().read_text(encoding="utf-8"))
    chunks = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n_chunks)]
    bos = tok.bos_id if tok.add_bos else None

    def run() -> tuple[np.ndarray, np.ndarray]:
        logits, targets = [], []
        for c in chunks:
            c = list(c)
            if bos is not None:
                c[0] = bos
            logits.append(model.forward(c, model.make_cache(), logits_from=first)[: n_ctx - 1 - first])
            targets.append(np.asarray(c[first + 1:]))
        return np.concatenate(logits), np.concatenate(targets)

    def ppl(logits: np.ndarray, targets: np.ndarray) -> float:
        lp = log_softmax(logits)
        return float(np.exp(-lp[np.arange(len(targets)), targets].mean()))

    SimLinear.recipe = None
    ref, targets = run()
    base = ppl(ref, targets)
    print(f"\n## 3. End to end: {n_chunks} chunks of {n_ctx}, {len(targets)} scored tokens\n")
    print("| recipe | PPL | ΔPPL vs float | mean KLD | top-1 % | s |")
    print("|---|---|---|---|---|---|")
    print(f"| float32 | {base:.3f} | | | | |")
    for name in recipes:
        t0 = time.perf_counter()
        SimLinear.recipe = name
        logits, _ = run()
        d = divergence(ref, logits)
        p = ppl(logits, targets)
        print(f"| {name} | {p:.3f} | {100 * (p / base - 1):+.2f} % | {d.mean_kl:.4f} | {100 * d.top1_rate:.1f} | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)
    SimLinear.recipe = None
    if SimLinear.fallbacks:
        print(f"\n(left float, recipe does not apply: {', '.join(sorted(SimLinear.fallbacks))})")


def section_wht() -> None:
    print("\n## Walsh-Hadamard transform timing (ms per call, float64)\n")

    def butterfly(x: np.ndarray) -> np.ndarray:
        n = x.shape[-1]
        y = x.reshape(-1, n).copy()
        h = 1
        while h < n:
            v = y.reshape(-1, n // (2 * h), 2, h)
            a, b = v[:, :, 0, :], v[:, :, 1, :]
            t = a.copy()
            a += b
            np.subtract(t, b, out=b)
            h *= 2
        return y

    def timed(f, *a, reps: int = 10) -> float:
        f(*a)
        t = time.perf_counter()
        for _ in range(reps):
            f(*a)
        return (time.perf_counter() - t) / reps * 1e3

    print("| K | block | M | dense K x K | dense per block | butterfly | fwht (Kronecker) |")
    print("|---|---|---|---|---|---|---|")
    for k in (576, 640, 1024, 1536, 2048):
        for kind in ("block", "pad"):
            rot = qm.block_hadamard_rotation(k) if kind == "block" else qm.padded_hadamard_rotation(k)
            if kind == "pad" and rot.k_pad == k:
                continue
            b = rot.block
            full = np.kron(np.eye(rot.k_pad // b), qm.hadamard(b))
            h = qm.hadamard(b)
            for m in (1, 64, 512):
                x = np.random.default_rng(0).standard_normal((m, rot.k_pad))
                xb = x.reshape(-1, b)
                assert np.allclose(qm.fwht(xb), xb @ h) and np.allclose(butterfly(xb) / np.sqrt(b), xb @ h)
                row = [timed(np.matmul, x, full), timed(np.matmul, xb, h), timed(butterfly, xb), timed(qm.fwht, xb)]
                print(f"| {k}{' -> ' + str(rot.k_pad) if kind == 'pad' else ''} | {b} | {m} | "
                      + " | ".join(f"{v:.3f}" for v in row) + " |")


def section_weight_error(weights: list[Weight]) -> None:
    print("\n## 3. Requantization error of the weights, ||W_q - W|| / ||W|| (root mean square over tensors)\n")
    cols = [("per channel, absmax", "chan", "absmax"), ("per channel, MSE clip", "chan", "mse")] + [
        (f"per {g} inputs, MSE clip", g, "mse") for g in (32, 64, 192)]
    print("| bits | rotation | " + " | ".join(c[0] for c in cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for bits in (8, 4):
        for rot in ("none", "block", "pad"):
            errs: dict[str, list[float]] = defaultdict(list)
            for w in weights:
                f = w.dequantize().astype(np.float64)
                k = f.shape[1]
                r = {"none": None, "block": qm.block_hadamard_rotation(k), "pad": qm.padded_hadamard_rotation(k)}[rot]
                fr = f if r is None else qm.rotate_weight(f, r)
                for label, group, clip in cols:
                    if group != "chan" and (fr.shape[1] % group or rot == "pad"):
                        continue
                    codes, scale = (qm.quantize_per_channel(fr, bits, clip) if group == "chan"
                                    else qm.quantize_groupwise(fr, group, bits, clip))
                    err = np.linalg.norm(qm.dequantize_codes(codes, scale) - fr) / np.linalg.norm(f)
                    errs[label].append(float(err))
            cells = [f"{np.sqrt(np.mean(np.square(errs[c[0]]))):.4f}" if errs.get(c[0]) else "-" for c in cols]
            print(f"| int{bits} | {rot} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=assets.SMOLLM2, help="known model name or GGUF path")
    ap.add_argument("--tokens", type=int, default=128, help="tokens of real activations per linear")
    ap.add_argument("--layer-step", type=int, default=3, help="matmul errors on every n-th block (1: all)")
    ap.add_argument("--recipes", default=",".join(P.PIPELINES), help="comma-separated recipe names")
    ap.add_argument("--ppl-chunks", type=int, default=0, help="also run perplexity/KLD on this many 512-token chunks")
    ap.add_argument("--wht", action="store_true", help="also time the Walsh-Hadamard transform variants")
    ap.add_argument("--weight-error", action="store_true", help="also the weights' requantization error")
    args = ap.parse_args(argv)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    t0 = time.perf_counter()
    g = GGUFFile(assets.resolve_model(args.model))
    print(f"# Quantization recipes on {g.kv.get('general.name', args.model)}")
    section_gguf_exact(linear_weights(g))
    section_matmul(linear_weights(g, args.layer_step), capture_activations(g, args.tokens), recipes)
    if args.weight_error:
        section_weight_error(linear_weights(g, args.layer_step))
    if args.ppl_chunks:
        section_ppl(g, recipes, args.ppl_chunks)
    if args.wht:
        section_wht()
    print(f"\n(total {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
