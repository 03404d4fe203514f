"""What int8 activations cost per tensor role, and which roles the default "cpu" spec gives 16-bit activations.

    python benchmarks/act_precision.py                      # both models, 3 chunks (~15 min)
    python benchmarks/act_precision.py --models smollm2-135m --chunks 4 --sets "attn_v,ffn_down;attn_v"

Scores the second half of each 512-token chunk of lee_background (llama-perplexity's method) and prints, per
configuration, the mean KL(float path || configuration) and top-1 agreement with the float path ("cpu-ref", the
dequantized weights in float32). Configurations: all "cpu:a8"; one role at a time on "cpu:a16" (what that role's
int8 rounding adds); the sets given with --sets; the default "cpu"; all "cpu:a16". The KL of a role measured alone
is close to the drop it brings within a set: the contributions add.
"""

from __future__ import annotations

import argparse

import numpy as np

from npulm import Llama, assets
from npulm.cpu import ACT16_ROLES
from npulm.evaluate import log_softmax

ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output")


def role_pattern(role: str) -> str:
    # the output matmul is output.weight, or token_embd.weight when the model ties them
    return "output.*,token_embd.*" if role == "output" else f"blk.*.{role}.*"


def overrides(roles: list[str], rest: str = "cpu:a8") -> list[str]:
    return [f"{p}=cpu:a16" for r in roles for p in role_pattern(r).split(",")] + [f"*={rest}"]


def chunk_logprobs(path: str, tensor_overrides: list[str], tokens: list[int] | None, chunks: int):
    llm = Llama(path, n_ctx=512, verbose=False, tensor_overrides=tensor_overrides)
    tokens = tokens or llm.tokenize(assets.lee_background().read_text(), add_bos=True)
    out = []
    for c in range(chunks):
        llm.reset()
        out.append(log_softmax(llm.session.eval(tokens[c * 512:(c + 1) * 512], logits_from=256)[:-1]))
    return np.concatenate(out).astype(np.float32), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--chunks", type=int, default=3)
    ap.add_argument("--sets", default="", help="role sets on cpu:a16, ';' between sets, ',' between roles")
    ap.add_argument("--no-roles", action="store_true", help="skip the one-role-at-a-time rows")
    args = ap.parse_args()
    for model in args.models.split(","):
        path = str(assets.model_path(model))
        ref, tokens = chunk_logprobs(path, ["*=cpu-ref"], None, args.chunks)
        p_ref = np.exp(ref.astype(np.float64))
        configs = {"all a8": ["*=cpu:a8"]}
        if not args.no_roles:
            configs |= {f"{r} a16": overrides([r]) for r in ROLES}
        configs |= {f"{s} a16": overrides(s.split(",")) for s in args.sets.split(";") if s}
        configs |= {f"default cpu ({','.join(ACT16_ROLES)} a16)": ["*=cpu"], "all a16": ["*=cpu:a16"]}
        print(f"\n{model}: {args.chunks} chunks, {len(ref)} scored tokens\n")
        print("| configuration | KL vs float path | top-1 |\n|---|---|---|")
        for name, ot in configs.items():
            lp, _ = chunk_logprobs(path, ot, tokens, args.chunks)
            kl = (p_ref * (ref - lp)).sum(-1).mean()
            print(f"| {name} | {kl:.6f} | {np.mean(ref.argmax(-1) == lp.argmax(-1)) * 100:.1f} % |", flush=True)


if __name__ == "__main__":
    main()
