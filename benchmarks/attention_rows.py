"""Where attention of M new tokens should leave the fused loop for batched BLAS (npulm.models.blocks.DECODE_ROWS).

The fused loop (C, `_kernels.attention`) computes each query row as it is computed alone, so it is exact whatever
the chunking of a prompt; the BLAS path converts the visible float16 cache once and multiplies whole chunks. Prints,
per head shape (SmolLM2's 9 x 3 x 64, Gemma-3's 4 x 1 x 256) and context, the best of 30 calls of each path.

    python benchmarks/attention_rows.py [--rows 8 16 32 64] [--ctx 0 200 1000] [-t 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from npulm import cpu
from npulm.models import blocks
from npulm.models.cache import KVCache

SHAPES = {"SmolLM2 (9 x 3 x 64)": (9, 3, 64), "Gemma-3 (4 x 1 x 256)": (4, 1, 256)}


def best_us(q, k, v, cache: KVCache, shape: blocks.AttentionShape, fused: bool, reps: int = 30) -> float:
    saved, blocks.DECODE_ROWS = blocks.DECODE_ROWS, q.shape[0] if fused else 0
    try:
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            blocks.attention(q, k, v, cache, shape)
            best = min(best, time.perf_counter() - t0)
            cache.trim(q.shape[0])
    finally:
        blocks.DECODE_ROWS = saved
    return best * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--ctx", type=int, nargs="+", default=[0, 200, 1000], help="tokens already in the cache")
    ap.add_argument("-t", "--threads", type=int, default=2)
    args = ap.parse_args()
    if not cpu.available():
        raise SystemExit("attention_rows: the C kernels are not built")
    cpu.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print("| heads | context | " + " | ".join(f"M = {m}: BLAS / fused us" for m in args.rows) + " |")
    print("|---|---|" + "---|" * len(args.rows))
    for name, (nh, nkv, d) in SHAPES.items():
        shape = blocks.AttentionShape(nh, nkv, d, d, d ** -0.5)
        for ctx in args.ctx:
            cells = []
            for m in args.rows:
                cache = KVCache(nkv, ctx + m, d, d, np.float16)
                if ctx:
                    kv = rng.standard_normal((ctx, nkv, d)).astype(np.float32)
                    cache.append(kv, kv)
                q = rng.standard_normal((m, nh, d)).astype(np.float32)
                k = rng.standard_normal((m, nkv, d)).astype(np.float32)
                blas, fused = (best_us(q, k, k, cache, shape, f) for f in (False, True))
                cells.append(f"{blas:.0f} / {fused:.0f}")
            print(f"| {name} | {ctx} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
