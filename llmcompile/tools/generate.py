"""``llmcompile.generate`` and ``llmcompile generate``: greedy generation through compiled
graphs (a model and a recipe) or through an exported ONNX file."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from ..deploy.generate import GenerationStats, Session, early_exit_config, session
from ..registry import resolve_recipe

log = logging.getLogger("llmcompile")

__all__ = ["add_arguments", "generate", "main", "prepare"]


def generate(model: Any, input_ids: Any, recipe: Any = None, *, max_new_tokens: int = 32,
             eos_token_id: int | None = None, tokenizer: Any = None
             ) -> tuple[torch.Tensor, GenerationStats]:
    """See :func:`llmcompile.generate`."""
    return prepare(model, recipe, tokenizer).generate(input_ids, max_new_tokens, eos_token_id)


def prepare(model: Any, recipe: Any = None, tokenizer: Any = None) -> Session:
    """The compiled :class:`~llmcompile.deploy.generate.Session` of a model spec under a recipe
    spec (exits checked against the model first; distilled heads trained on first use)."""
    from .explain import load_model

    recipe = resolve_recipe(recipe)
    module = load_model(model)
    config = early_exit_config(recipe)
    if config is not None:
        config.check_model(int(module.config.get_text_config(decoder=True).num_hidden_layers))
    if tokenizer is None:
        tokenizer = _compat.tokenizer_path(module)
    adapters = None
    if config is not None and config.head == "distilled":
        from ..deploy.exit_heads import adapter_files

        adapters = adapter_files(module, config, tokenizer)
    return session(module, recipe, tokenizer, adapters)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="an .onnx file written by `llmcompile export`, or a model: "
                   "'smollm2', a tiny architecture name or a transformers folder")
    p.add_argument("--prompt", required=True)
    p.add_argument("--recipe", default="default",
                   help="preset name or .toml path (models only; e.g. early-exit)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (.onnx)")
    p.add_argument("--stats", action="store_true",
                   help="print tokens/s, acceptance rate, tokens per verification")


def main(args: argparse.Namespace) -> int:
    if str(args.model).endswith(".onnx"):
        from ..deploy.runner import OnnxCausalLM
        from ..quant.calibrate import load_tokenizer

        lm = OnnxCausalLM(args.model, threads=args.threads)
        tokenizer = load_tokenizer(Path(args.model).parent)
        ids = tokenizer(args.prompt).input_ids
        print(tokenizer.decode(lm.generate(ids, args.max_new_tokens)))
        return 0
    from .explain import load_model
    from .models import load_smollm2

    if str(args.model).lower() in ("smollm2", "smollm2-135m"):
        module, tokenizer = load_smollm2()
    else:
        module = load_model(args.model)
        from ..quant.calibrate import load_tokenizer

        path = _compat.tokenizer_path(module)
        if path is None:
            raise ValueError(f"{args.model!r} has no tokenizer to encode --prompt with")
        tokenizer = load_tokenizer(path)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    eos = getattr(module.generation_config, "eos_token_id", None)
    eos = eos[0] if isinstance(eos, list) else eos
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    out, stats = generate(module, ids, args.recipe, max_new_tokens=args.max_new_tokens,
                          eos_token_id=eos, tokenizer=tokenizer)
    print(tokenizer.decode(out[0, ids.shape[1]:]))
    if args.stats:
        print(stats.format())
    return 0
