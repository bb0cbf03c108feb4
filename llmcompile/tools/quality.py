"""``llmcompile quality``: perplexity of a model under recipes, on held-out real text.

Lossy recipes are judged here. Each recipe compiles the model's forward (target ``eager`` by
default: the rewritten graph runs without Inductor, so no compile time is spent, with the same
numerics up to float rounding), and perplexity is computed on non-overlapping windows of the
evaluation text. The calibration text shipped with the package is a different novel.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.resources
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..registry import resolve_recipe

__all__ = ["add_arguments", "main", "perplexity", "run_quality"]

#: held-out evaluation text shipped with the package: an excerpt of Emma (public domain), a
#: different novel from the calibration text (Pride and Prejudice)
DEFAULT_TEXT = Path(str(importlib.resources.files("llmcompile") / "data" / "eval_emma.txt"))


def _windows(tokenizer, text: str, windows: int, seq_len: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(windows, ids.numel() // seq_len)
    if n == 0:
        raise ValueError(f"evaluation text has {ids.numel()} tokens, fewer than one window "
                         f"of {seq_len}")
    return ids[: n * seq_len].view(n, seq_len)


def perplexity(forward, windows: torch.Tensor, desc: str = "", progress: bool = True) -> float:
    """exp(mean next-token NLL) over ``windows [W, L]`` (each scored independently)."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for ids in tqdm(windows, desc=f"perplexity {desc}", disable=not progress, leave=False):
            logits = forward(input_ids=ids[None], use_cache=False).logits[0].float()
            nll += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum"))
            count += ids.numel() - 1
    return math.exp(nll / count)


def run_quality(model: str = "smollm2", recipes: tuple[str, ...] = ("int8", "int4-rtn", "int4"),
                text: str | Path | None = None, windows: int = 8, seq_len: int = 512,
                target: str = "eager", progress: bool = True) -> dict[str, Any]:
    """Perplexity of the float model and of each recipe; relative change vs float."""
    from .models import load_smollm2, smollm2_folder

    if model != "smollm2":
        raise ValueError("quality needs a real model and its tokenizer: only 'smollm2' is known")
    base, tokenizer = load_smollm2()
    body = Path(text or DEFAULT_TEXT).read_text()
    ids = _windows(tokenizer, body, windows, seq_len)
    rows = [{"config": "float32", "perplexity": perplexity(base.forward, ids, "float32",
                                                             progress), "seconds": 0.0}]
    for name in recipes:
        recipe = dataclasses.replace(resolve_recipe(name), target=target)
        torch.compiler.reset()
        start = time.perf_counter()
        compiled = torch.compile(base.forward, backend="llmcompile", dynamic=False,
                                 options={"recipe": recipe, "fallback": False,
                                          "tokenizer": str(smollm2_folder())})
        ppl = perplexity(compiled, ids, name, progress)
        rows.append({"config": name, "perplexity": ppl, "seconds": time.perf_counter() - start})
    torch.compiler.reset()
    ref = rows[0]["perplexity"]
    for row in rows:
        row["change"] = row["perplexity"] / ref - 1.0
    return {"model": model, "text": str(text or DEFAULT_TEXT), "windows": int(ids.shape[0]),
            "seq_len": seq_len, "target": target, "rows": rows}


def format_table(result: dict[str, Any]) -> str:
    width = max(14, *(len(row["config"]) + 2 for row in result["rows"]))
    lines = [f"perplexity of {result['model']} on {Path(result['text']).name}: "
             f"{result['windows']} windows x {result['seq_len']} tokens (target "
             f"{result['target']})", f"{'config':<{width}}{'perplexity':>12}{'change':>10}"]
    for row in result["rows"]:
        lines.append(f"{row['config']:<{width}}{row['perplexity']:>12.3f}"
                     f"{row['change']:>+10.2%}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--recipes", nargs="*", default=["int8", "int4-rtn", "int4"])
    parser.add_argument("--text", default=None,
                        help="evaluation text (default: the shipped Emma excerpt)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--target", default="eager", choices=["eager", "inductor", "onnxruntime"])
    parser.add_argument("--json", default=None, help="write the result as JSON")


def main(args: argparse.Namespace) -> int:
    result = run_quality(args.model, tuple(args.recipes), args.text, args.windows,
                         args.seq_len, args.target)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
