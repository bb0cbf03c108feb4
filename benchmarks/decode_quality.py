"""Perplexity of SmolLM2 through the *decode* graphs, with and without llmcompile's CPU kernels.

`llmcompile quality` scores whole windows in one forward (prefill graphs, which keep ATen's
matmuls); the CPU decode kernels (llmcompile/lower/gemv.py) only run in static graphs of a few
rows. This script scores each window token by token through `llmcompile.generate`'s compiled
decode step (teacher forcing: the next input is the text's token, not the argmax), so their
numerics are what is measured: float32 / int8 kernels compute in float32, the int4 kernel
quantizes activations to int8 per group of 64.

    python benchmarks/decode_quality.py --recipes default int8 int4 --windows 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from llmcompile.deploy.generate import Session
from llmcompile.ops import kernels
from llmcompile.registry import resolve_recipe
from llmcompile.tools.models import load_smollm2, smollm2_folder
from llmcompile.tools.quality import DEFAULT_TEXT, _windows


@torch.no_grad()
def decode_perplexity(session: Session, windows: torch.Tensor, prefix: int) -> float:
    nll, count = 0.0, 0
    for ids in windows:
        logits = session.score(ids, prefix)  # one prefill, then one decode step per token
        nll += float(F.cross_entropy(logits, ids[prefix:], reduction="sum"))
        count += logits.shape[0]
    return math.exp(nll / count)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipes", nargs="+", default=["default", "int8", "int4"])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--prefix", type=int, default=32, help="tokens given as a prefill first")
    args = p.parse_args()
    model, tokenizer = load_smollm2()
    windows = _windows(tokenizer, DEFAULT_TEXT.read_text(), args.windows, args.seq_len)
    print(f"SmolLM2, {len(windows)} windows x {args.seq_len} tokens of Emma, scored from token "
          f"{args.prefix} on through the decode step")
    have = kernels.load()
    for name in args.recipes:
        recipe = resolve_recipe(name)
        for on in (True, False):
            kernels._state["ok"] = on and have
            torch._dynamo.reset()
            session = Session(model, recipe, str(smollm2_folder()))
            ppl = decode_perplexity(session, windows, args.prefix)
            print(f"{name:<10} kernels {'on ' if on else 'off'}  perplexity {ppl:.3f}", flush=True)


if __name__ == "__main__":
    main()
