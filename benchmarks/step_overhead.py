"""How much of a SmolLM2 decode step is spent outside the compiled graph.

Times ``llmcompile.generate``'s decode step (``Session.decode_step``) and, inside it, the
callable the llmcompile backend returned for the step graph; the difference is Dynamo's guards,
transformers' Python around the graph and the loop's own work. With
``LLMCOMPILE_DIRECT_STEP=0`` every step goes through Dynamo; by default, steps after the second
call the graph directly (llmcompile/deploy/direct.py) and the difference should nearly vanish.

    python benchmarks/step_overhead.py int8 int4
    LLMCOMPILE_DIRECT_STEP=0 python benchmarks/step_overhead.py int8 int4
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmcompile import _compat, backend
from llmcompile.deploy.generate import Session
from llmcompile.registry import resolve_recipe
from llmcompile.tools.models import load_smollm2

_inside: list[float] = []


def _timed_backend() -> None:
    """Wrap what the backend returns so each call of a compiled graph is timed."""
    compile_graph = backend.compile_graph

    def wrapped(*args, **kwargs):
        fn, report = compile_graph(*args, **kwargs)
        if fn is None:
            return fn, report

        def timed(*inputs):
            start = time.perf_counter()
            out = fn(*inputs)
            _inside.append(time.perf_counter() - start)
            return out
        return timed, report
    backend.compile_graph = wrapped


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipes", nargs="+")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    _timed_backend()
    model, _ = load_smollm2()
    prompt = torch.randint(100, 10000, (1, args.prompt_len),
                           generator=torch.Generator().manual_seed(0))
    for name in args.recipes:
        s = Session(model, resolve_recipe(name), _compat.tokenizer_path(model))
        steps, inside = [], []
        for _ in range(args.rounds):  # the first round compiles and warms up
            steps.clear()
            inside.clear()
            s.reserve(args.prompt_len + args.steps + 1)
            s._cache_for(args.prompt_len + args.steps + 1)
            with torch.no_grad():
                token = int(s._run(s.prefill, prompt, 0)[-1].argmax())
                for i in range(args.steps):
                    _inside.clear()
                    start = time.perf_counter()
                    token = int(s.decode_step(token, args.prompt_len + i).argmax())
                    steps.append(time.perf_counter() - start)
                    inside.append(sum(_inside))
        step, graph = statistics.median(steps), statistics.median(inside)
        print(f"{name}: step {1000 * step:.2f} ms, in the compiled graph {1000 * graph:.2f} ms, "
              f"outside it {1000 * (step - graph):.2f} ms", flush=True)


if __name__ == "__main__":
    main()
