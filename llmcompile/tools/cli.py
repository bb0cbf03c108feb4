"""The ``llmcompile`` command line: explain, recipes, cost, machine, quality, bench, export,
generate, profile."""

from __future__ import annotations

import argparse
import json
import sys

from ..core.recipe import RecipeError
from ..registry import presets, resolve_recipe

__all__ = ["main"]


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    if args.exits is not None:
        from .exits import explain_exits

        print(explain_exits(args.model, args.exits or None, args.distilled))
        return 0
    reports = explain(args.model, args.recipe, prompt_len=args.prompt_len,
                      lower=True if args.lower else None)
    if args.json:
        print(json.dumps([{"recipe": r.recipe, "folded": r.folded, "fallback": r.fallback,
                           "fallback_stage": r.fallback_stage, "passes": [
            {"phase": p.phase, "pass": p.name, "rules": {
                name: {"fired": s.fired, "near_misses": s.near_misses}
                for name, s in p.stats.rules.items()}} for p in r.runs]} for r in reports],
            indent=2))
        return 0
    for i, report in enumerate(reports):
        print(f"graph {i}: " + report.format(misses=args.misses))
    fell = sum(r.fallback is not None for r in reports)
    if fell:
        print(f"{fell} of {len(reports)} graph(s) would fall back to plain Inductor")
    from ..core.stages import format_table

    print(format_table())  # where this command's time went, torch's cache hits
    return 0


def _recipes(args: argparse.Namespace) -> int:
    if args.name:
        print(resolve_recipe(args.name).to_toml(), end="")
        return 0
    for name, path in sorted(presets().items()):
        first = path.read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<14} {first}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import logging

    from ..deploy.export import export

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = export(args.model, args.output, args.recipe, tokenizer=args.tokenizer,
                    provider=args.provider)
    print(f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB with external data), "
          f"recipe {result.report.recipe!r}")
    for name, count in sorted(result.report.counts().items()):
        if count:
            print(f"  {name:<28} {count}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from ..quant import store

    found = store.entries()
    if args.action == "list":
        for entry in found:
            print(store.describe(entry))
    if args.action in ("list", "size"):
        print(f"{len(found)} quantized layers, {sum(e.size for e in found) / 2**20:.1f} MiB in "
              f"{store.cache_root() / 'quant'} (cap: LLMCOMPILE_CACHE_MAX_GB, default 20)")
    if args.action == "clear":
        print(f"removed {store.clear()} quantized layers from {store.cache_root() / 'quant'}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmcompile", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("explain", help="which rules fire on a model, and near misses with reasons")
    p.add_argument("model", help="tiny architecture (llama, qwen2, ...), 'smollm2' or a folder")
    p.add_argument("--recipe", default="default", help="preset name or .toml path")
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--misses", type=int, default=3, help="near misses shown per rule")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--lower", action="store_true",
                   help="also lower each graph (always done for target onnxruntime), so "
                        "lowering fallbacks are reported")
    p.add_argument("--exits", type=int, nargs="*", default=None, metavar="LAYER",
                   help="instead: top-1 agreement of an exit after each LAYER (default: all) "
                        "with the full model on held-out text, and the predicted speculative "
                        "speedup (early-exit recipes)")
    p.add_argument("--distilled", action="store_true",
                   help="with --exits: also train (or load) a distilled exit head per layer")
    p.set_defaults(func=_explain)

    p = sub.add_parser("cache", help="quantization artifacts stored under "
                       "$LLMCOMPILE_CACHE_DIR: list, size, clear")
    p.add_argument("action", choices=["list", "size", "clear"])
    p.set_defaults(func=_cache)

    p = sub.add_parser("recipes", help="list the shipped presets, or print one as TOML")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_recipes)

    from . import quality

    p = sub.add_parser("quality", help="perplexity of recipes on held-out text")
    quality.add_arguments(p)
    p.set_defaults(func=quality.main)

    p = sub.add_parser("export", help="write an ONNX file (KV-cache I/O) for deployment")
    p.add_argument("model", help="'smollm2', a tiny architecture name or a transformers folder")
    p.add_argument("output", help="the .onnx file to write (weights go to <output>.data)")
    p.add_argument("--recipe", default="default", help="preset name or .toml path")
    p.add_argument("--tokenizer", help="tokenizer folder (calibrated recipes; saved with "
                   "the file); default: the model's own folder")
    p.add_argument("--provider", default="CPUExecutionProvider",
                   choices=["CPUExecutionProvider", "CUDAExecutionProvider"],
                   help="emit the contrib ops this provider runs")
    p.set_defaults(func=_export)

    from . import generate

    p = sub.add_parser("generate", help="greedy generation: a model through its compiled "
                       "graphs (self-speculative with an early-exit recipe), or an ONNX file")
    generate.add_arguments(p)
    p.set_defaults(func=generate.main)

    from . import profile

    p = sub.add_parser("profile", help="where a decode step's time goes: matmuls, LM head, "
                       "attention, cache writes, generated kernels, per-step overhead")
    profile.add_arguments(p)
    p.set_defaults(func=profile.main)

    from . import cost, machine

    p = sub.add_parser("cost", help="closed-form FLOPs and bytes of prefill(s) and decode(p), "
                       "predicted TTFT / TPOT / MBU, and what each pass changed")
    cost.add_arguments(p)
    p.set_defaults(func=cost.main)

    p = sub.add_parser("machine", help="this machine's measured roofline (bandwidth, GEMM "
                       "FLOP/s, matmul kernels, overhead), cached")
    machine.add_arguments(p)
    p.set_defaults(func=machine.main)

    from . import bench_onnx

    p = sub.add_parser("bench-onnx", help="exported ONNX files vs torch.onnx.export + ONNX "
                       "Runtime's optimizer: size, prefill, decode")
    bench_onnx.add_arguments(p)
    p.set_defaults(func=bench_onnx.main)

    try:
        from . import bench
    except ImportError:  # bench is optional at import time only if its deps are missing
        bench = None
    if bench is not None:
        p = sub.add_parser("bench", help="prefill / decode speed and MBU, side by side")
        bench.add_arguments(p)
        p.set_defaults(func=bench.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (RecipeError, ValueError, FileNotFoundError) as e:
        print(f"llmcompile: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
