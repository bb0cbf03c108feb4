"""Sparse attention on SmolLM2 (BENCHMARKS.md, "Sparse attention"): prefill time, dense vs
the ``window`` preset, and decode speed and KV-cache bytes, dense static cache vs SinkCache.

    python benchmarks/sparse_attention.py prefill --lengths 2048 4096 8192
    python benchmarks/sparse_attention.py decode --positions 256 1024 4096

Prefill: one forward over a prompt of L tokens without a cache (``use_cache=False``, logits of
the last token), plain Inductor (``torch.compile``, dense SDPA with Hugging Face's causal mask)
against ``backend="llmcompile"`` with the ``window`` preset (FlexAttention, window 512 + 4
sinks); both compiled for that length first, then timed interleaved, median of ``--repeats``.

Decode: one-token steps after ``p`` positions, eager forward (what ``generate`` runs on CPU),
with a StaticCache of ``p + 8`` slots (dense: attends to all ``p``) and with
``llmcompile.SinkCache(window=512, sink_tokens=4)`` after a prefill of ``p`` tokens; the cache's
tensor bytes are reported beside the median step time.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import llmcompile
from llmcompile import _compat
from llmcompile.ops import cpu
from llmcompile.tools.models import load_smollm2


def _seconds(fn, **kwargs) -> float:
    start = time.perf_counter()
    fn(**kwargs)
    return time.perf_counter() - start


def prefill(lengths: list[int], repeats: int) -> None:
    model, _ = load_smollm2()
    print(f"{cpu.describe()}, {torch.get_num_threads()} threads")
    print(f"{'tokens':>7} {'dense ms':>10} {'window ms':>10} {'speedup':>8}")
    for length in lengths:
        ids = torch.randint(3, 40000, (1, length), generator=torch.Generator().manual_seed(0))
        kwargs = {"input_ids": ids, "use_cache": False, "logits_to_keep": 1}
        torch.compiler.reset()
        runs = {"dense": torch.compile(model.forward, dynamic=False),
                "window": torch.compile(model.forward, backend="llmcompile", dynamic=False,
                                        options={"recipe": "window", "fallback": False})}
        with torch.inference_mode():
            for fn in runs.values():
                fn(**kwargs)  # compile and warm up
            times = {name: [] for name in runs}
            for _ in range(repeats):  # interleaved
                for name, fn in runs.items():
                    times[name].append(_seconds(fn, **kwargs))
        dense, window = (statistics.median(times[n]) * 1e3 for n in ("dense", "window"))
        print(f"{length:>7} {dense:>10.0f} {window:>10.0f} {dense / window:>7.2f}x", flush=True)


def _cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
               if isinstance(t, torch.Tensor))


def decode(positions: list[int], steps: int) -> None:
    from transformers import StaticCache

    model, _ = load_smollm2()
    kw = _compat.cache_kwarg(model)
    print(f"{cpu.describe()}, {torch.get_num_threads()} threads")
    print(f"{'position':>8} {'dense ms/tok':>12} {'dense KV MiB':>12} {'sink ms/tok':>11} "
          f"{'sink KV MiB':>11}")
    for p in positions:
        ids = torch.randint(3, 40000, (1, p), generator=torch.Generator().manual_seed(0))
        row = []
        for cache in (StaticCache(config=model.config, max_cache_len=p + steps + 1),
                      llmcompile.SinkCache(window=512, sink_tokens=4, config=model.config)):
            with torch.inference_mode():
                out = model(input_ids=ids, **{kw: cache}, use_cache=True,
                            cache_position=torch.arange(p), logits_to_keep=1)
                token = out.logits[:, -1:].argmax(-1)
                times = []
                for i in range(steps):
                    start = time.perf_counter()
                    out = model(input_ids=token, **{kw: cache}, use_cache=True,
                                cache_position=torch.tensor([p + i]), logits_to_keep=1)
                    token = out.logits[:, -1:].argmax(-1)
                    times.append(time.perf_counter() - start)
            row += [statistics.median(times[1:]) * 1e3, _cache_bytes(cache) / 2**20]
        print(f"{p:>8} {row[0]:>12.1f} {row[1]:>12.1f} {row[2]:>11.1f} {row[3]:>11.1f}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prefill")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--repeats", type=int, default=3)
    d = sub.add_parser("decode")
    d.add_argument("--positions", type=int, nargs="+", default=[256, 1024, 4096])
    d.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-sparse-"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.what == "prefill":
        prefill(args.lengths, args.repeats)
    else:
        decode(args.positions, args.steps)


if __name__ == "__main__":
    main()
