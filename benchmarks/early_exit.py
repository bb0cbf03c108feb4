"""Early exit on SmolLM2 (BENCHMARKS.md, "Early exit"): which layer, speculative decoding
against the full model and Hugging Face's ``assistant_early_exit``, and the confident-mode curve.

    python benchmarks/early_exit.py exits      --layers 4 6 8 10 12 16 20 24 28
    python benchmarks/early_exit.py speculative --layer 10 --draft-tokens 1 2 4 --new 256
    python benchmarks/early_exit.py confident  --layer 10 20 --thresholds 0.5 0.7 0.9 0.95

exits: top-1 agreement of the exit after each layer with the full model on 1,024 held-out
tokens (Emma), shared head and (``--distilled``) trained adapters, and the predicted speedup
(:mod:`llmcompile.tools.exits`).

speculative: three prompts of 128 tokens from the held-out text, ``--new`` new tokens each,
greedy. ``llmcompile.generate`` with ``default`` (the full model compiled, static cache) against
early-exit recipes (shared and distilled heads) and ``model.generate(assistant_early_exit=L)``
(eager, as Hugging Face runs it on a CPU), each compiled / warmed first, then timed in
interleaved rounds. Every speculative output is checked token for token against ``default``.

confident: teacher-forced perplexity over 512 held-out tokens with confident exit at each
threshold (later layers' K/V filled from the exit), and the layers each token went through.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch

import llmcompile
from llmcompile import load_recipe
from llmcompile.tools.exits import confident_perplexity, exit_table, format_table, held_out_tokens
from llmcompile.tools.models import load_smollm2


def _recipe(layer: int, k: int = 4, head: str = "shared", mode: str = "speculative",
            threshold: float = 0.9, layers: list[int] | None = None, adaptive: bool = False):
    return load_recipe({"name": f"ee-{head}-L{layer}-k{k}", "passes": [
        {"name": "fuse"}, {"name": "early_exit", "layers": layers or [layer], "head": head,
                           "draft_tokens": k, "mode": mode, "threshold": threshold,
                           "adaptive": adaptive}]})


def exits(args) -> None:
    model, tokenizer = load_smollm2()
    tokens = held_out_tokens(tokenizer, 100_000)[:1024]
    adapters = None
    if args.distilled:
        from llmcompile.deploy.exit_heads import adapter_files, load_adapter

        config = _recipe(args.distilled[0], head="distilled", layers=args.distilled).passes[1]
        files = adapter_files(model, config, tokenizer)
        adapters = {layer: load_adapter(path) for layer, path in files.items()}
    print(format_table(exit_table(model, tokens, args.layers, adapters)))


def speculative(args) -> None:
    model, tokenizer = load_smollm2()
    tokens = held_out_tokens(tokenizer, 100_000)
    prompts = [tokens[s:s + 128][None] for s in (2000, 6000, 10000)]
    eos = None  # fixed length: every configuration produces --new tokens
    configs = {"default": load_recipe("default")}
    for k in args.draft_tokens:
        configs[f"early-exit shared L{args.layer} k{k}"] = _recipe(args.layer, k)
        if args.distilled:
            configs[f"early-exit distilled L{args.layer} k{k}"] = _recipe(args.layer, k,
                                                                          "distilled")
    if args.preset:
        configs["early-exit preset (adaptive)"] = load_recipe("early-exit")
    runs = {}
    for name, recipe in configs.items():
        start = time.perf_counter()
        # the timed length: the static cache (and so every graph) is sized by it
        llmcompile.generate(model, prompts[0], recipe, max_new_tokens=args.new,
                            tokenizer=tokenizer)
        print(f"compiled {name} in {time.perf_counter() - start:.0f} s", flush=True)

    def hf(prompt):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=args.new, do_sample=False,
                                  assistant_early_exit=args.layer, eos_token_id=eos,
                                  pad_token_id=tokenizer.eos_token_id)
    hf(prompts[0][:, :16])
    for _ in range(args.rounds):
        for prompt in prompts:
            for name, recipe in configs.items():
                ids, stats = llmcompile.generate(model, prompt, recipe, max_new_tokens=args.new,
                                                 eos_token_id=eos, tokenizer=tokenizer,
                                                 return_stats=True)
                runs.setdefault(name, []).append((ids, stats))
            start = time.perf_counter()
            ids = hf(prompt)
            runs.setdefault(f"HF assistant_early_exit={args.layer} (eager)", []).append(
                (ids, time.perf_counter() - start))
    reference = [ids for ids, _ in runs["default"]]
    base, base_e2e = _tps(runs["default"]), _tps(runs["default"], prefill=True)
    print("\n| configuration | decode tok/s | x default | end-to-end tok/s | x default | "
          "acceptance | tokens / verification | tokens not drafted | same tokens as default |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, results in runs.items():
        same = all(torch.equal(ids, ref) for (ids, _), ref in zip(results, reference))
        tps, e2e = _tps(results), _tps(results, prefill=True)
        stats = [s for _, s in results if not isinstance(s, float)]
        accept = (sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats))
                  if stats and stats[0].mode == "speculative" else None)
        per = (sum(s.new_tokens - s.plain_steps for s in stats)
               / max(1, sum(s.verifications for s in stats)) if accept is not None else None)
        plain = sum(s.plain_steps for s in stats)
        print(f"| {name} | {'' if tps is None else f'{tps:.1f}'} | "
              f"{'' if tps is None else f'{tps / base:.2f}'} | {e2e:.1f} | {e2e / base_e2e:.2f} | "
              f"{'' if accept is None else f'{accept:.1%}'} | "
              f"{'' if per is None else f'{per:.2f}'} | "
              f"{'' if accept is None else plain} | {'yes' if same else 'NO'} |")


def _tps(results, prefill: bool = False) -> float | None:
    """New tokens per second: decode only, or end to end (prefill included) with ``prefill``.

    HF's ``generate`` is timed as one call, so it only has the end-to-end figure."""
    tokens = seconds = 0.0
    for ids, stats in results:
        if isinstance(stats, float):
            if not prefill:
                return None
            tokens += ids.shape[1] - 128
            seconds += stats
        else:
            tokens += stats.new_tokens
            seconds += stats.decode_s + (stats.prefill_s if prefill else 0.0)
    return tokens / seconds


@torch.no_grad()
def confident(args) -> None:
    model, tokenizer = load_smollm2()
    tokens = held_out_tokens(tokenizer, 100_000)[4000:4000 + args.prefix + args.tokens + 1]
    full = model(tokens[None]).logits[0].float().log_softmax(-1)
    targets = tokens[args.prefix + 1:]
    ref = math.exp(-full[args.prefix:-1].gather(-1, targets[:, None]).mean().item())
    print(f"full model: perplexity {ref:.2f} over {targets.numel()} tokens")
    print("| head | exits after | threshold | perplexity | change | layers per token "
          "(exit depth) | tokens exited early |\n|---|---|---|---|---|---|---|")
    for head in args.heads:
        for threshold in args.thresholds:
            recipe = _recipe(args.layer[0], head=head, mode="confident", threshold=threshold,
                             layers=args.layer)
            ppl, stats = confident_perplexity(model, tokens, recipe, args.prefix, tokenizer)
            early = sum(v for k, v in stats.exits.items() if k < stats.num_layers)
            print(f"| {head} | {args.layer} | {threshold} | {ppl:.2f} | {ppl / ref - 1:+.1%} | "
                  f"{stats.mean_layers:.1f} | {early / targets.numel():.0%} |", flush=True)


def main() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-ee-"))
    torch.set_num_threads(os.cpu_count() or 1)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("exits")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 6, 8, 10, 12, 16, 20, 24, 28])
    p.add_argument("--distilled", type=int, nargs="*", default=[])
    p.set_defaults(func=exits)
    p = sub.add_parser("speculative")
    p.add_argument("--layer", type=int, default=10)
    p.add_argument("--draft-tokens", type=int, nargs="+", default=[1, 4])
    p.add_argument("--distilled", action="store_true")
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--preset", action="store_true",
                   help="speculative: also time the early-exit preset (adaptive drafting)")
    p.add_argument("--rounds", type=int, default=1)
    p.set_defaults(func=speculative)
    p = sub.add_parser("confident")
    p.add_argument("--layer", type=int, nargs="+", default=[10, 20])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95])
    p.add_argument("--heads", nargs="+", default=["distilled"], choices=["shared", "distilled"])
    p.add_argument("--prefix", type=int, default=64)
    p.add_argument("--tokens", type=int, default=512)
    p.set_defaults(func=confident)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
