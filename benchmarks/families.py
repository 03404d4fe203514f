"""`npulm bench` rows for an RWKV-7 and a Qwen3-MoE test model (random weights, Q8_0, the tests' writers) on the CPU
and with every matmul on the NPU (W16A16, W8A16), plus the matmul calls per token each placement makes.

    python benchmarks/families.py [-p 64] [-n 16] [-r 2] [--embd 256] [--layers 4]

"matmuls/tok" counts Linear calls (one per weight matrix and forward pass; for the MoE one per selected expert
matrix: tokens are grouped per expert), "NPU runs/tok" the rknn_matmul_run calls behind them (each ~33 us on a board
before any work: cores x K-chunks per matmul). Without a board the NPU rows are the emulator's: their t/s measures
this machine's numpy, not a board; the call counts are the board's.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from gguf.constants import GGMLQuantizationType as T

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from gguf_writers import write_rwkv_model, write_tiny_model  # noqa: E402

from npulm import bench  # noqa: E402
from npulm.linear import Linear  # noqa: E402

PLACES = [bench.Placement(), bench.Placement("all", "W16A16"), bench.Placement("all", "W8A16_HADAMARD")]


def count_calls(path: str, place: bench.Placement, n_prompt: int, n_gen: int) -> tuple[float, float, float, float]:
    """(matmuls per token, NPU runs per token) for one prefill of n_prompt tokens, then for n_gen decode steps."""
    from npulm.api import Llama

    llm = Llama(path, n_ctx=n_prompt + n_gen + 8, verbose=False, n_npu_layers=place.npu_layers,
                pipeline=place.pipeline)
    counts = {"linear": 0, "npu": 0}
    classes = {type(lin) for lin in llm.model.linears}
    saved = {cls: cls.__call__ for cls in classes}

    def counting(call):
        def wrapper(self, x):
            counts["linear"] += 1
            return call(self, x)
        return wrapper

    for cls in classes:
        cls.__call__ = counting(saved[cls])
    rt = None
    if place.npu_layers:
        rt = llm.placement.npu.runtime
        run = rt.run

        def counting_run(ctx):
            counts["npu"] += 1
            return run(ctx)
        rt.run = counting_run
    try:
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, llm.n_vocab(), n_prompt + n_gen).tolist()
        llm.reset()
        llm.session.eval(tokens[:n_prompt])
        pp = (counts["linear"] / n_prompt, counts["npu"] / n_prompt)
        counts.update(linear=0, npu=0)
        for t in tokens[n_prompt:]:
            llm.session.eval([t])
        tg = (counts["linear"] / n_gen, counts["npu"] / n_gen)
    finally:
        for cls, call in saved.items():
            cls.__call__ = call
        if rt is not None:
            del rt.run
    return (*pp, *tg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", type=int, default=64, help="prompt tokens (pp)")
    ap.add_argument("-n", type=int, default=16, help="generated tokens (tg)")
    ap.add_argument("-r", type=int, default=2, help="timed runs per test")
    ap.add_argument("--embd", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    assert Linear  # the counted interface
    with tempfile.TemporaryDirectory() as d:
        models = {
            "rwkv7": write_rwkv_model(Path(d) / "rwkv7.gguf", 7, T.Q8_0, n_embd=args.embd, n_ff=4 * args.embd,
                                      n_layer=args.layers, n_ctx=4096),
            "qwen3moe": write_tiny_model(Path(d) / "qwen3moe.gguf", "qwen3moe", T.Q8_0, n_layer=args.layers,
                                         n_embd=args.embd, n_head=4, n_head_kv=2, head_dim=args.embd // 4,
                                         n_ff=args.embd, n_ctx=4096, tied=False, n_expert=16, n_expert_used=4),
        }
        rows, calls = [], []
        for name, path in models.items():
            rows += bench.run_bench([str(path)], [args.p], [args.n], args.r, (2,), PLACES)
            for place in PLACES:
                calls.append((name, place.pipeline or "CPU", *count_calls(str(path), place, args.p, args.n)))
    print(bench.format_md(rows))
    print(f"| model | backend | matmuls/tok pp{args.p} | NPU runs/tok pp{args.p} | matmuls/tok tg | NPU runs/tok tg |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for name, backend, mpp, npp, mtg, ntg in calls:
        print(f"| {name} | {backend} | {mpp:.2f} | {npp:.2f} | {mtg:.2f} | {ntg:.2f} |")
    print("\nmachine shared with other jobs: t/s ratios within one run only; NPU rows are emulated (numpy).")


if __name__ == "__main__":
    main()
