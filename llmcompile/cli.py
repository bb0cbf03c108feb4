"""The ``llmcompile`` command line: explain, recipes, bench."""

from __future__ import annotations

import argparse
import json
import sys

from .recipe import RecipeError, presets, resolve_recipe

__all__ = ["main"]


def _explain(args: argparse.Namespace) -> int:
    from .explain import explain

    reports = explain(args.model, args.recipe, prompt_len=args.prompt_len)
    if args.json:
        print(json.dumps([{"recipe": r.recipe, "folded": r.folded, "passes": [
            {"phase": p.phase, "pass": p.name, "rules": {
                name: {"fired": s.fired, "near_misses": s.near_misses}
                for name, s in p.stats.rules.items()}} for p in r.runs]} for r in reports],
            indent=2))
        return 0
    for i, report in enumerate(reports):
        print(f"graph {i}: " + report.format(misses=args.misses))
    return 0


def _recipes(args: argparse.Namespace) -> int:
    if args.name:
        print(resolve_recipe(args.name).to_toml(), end="")
        return 0
    for name, path in sorted(presets().items()):
        first = path.read_text().splitlines()[0].lstrip("# ")
        print(f"{name:<14} {first}")
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
    p.set_defaults(func=_explain)

    p = sub.add_parser("recipes", help="list the shipped presets, or print one as TOML")
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_recipes)

    from . import quality

    p = sub.add_parser("quality", help="perplexity of recipes on held-out text")
    quality.add_arguments(p)
    p.set_defaults(func=quality.main)

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
