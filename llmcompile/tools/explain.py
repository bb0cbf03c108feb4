"""``llmcompile explain``: which rules fire on a model, per phase, and why others declined.

Runs capture and the recipe's pipeline exactly as the backend does, so explaining even a
30-layer model takes seconds. Lowering runs too where it can fail in ways a user should see
before deploying (target ``onnxruntime``; ``lower=True`` forces it): a graph that would fall
back to plain Inductor is reported with the step and the cause (``Report.fallback``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from ..core.pipeline import Report
from ..core.recipe import Recipe, RecipeError
from ..registry import resolve_recipe

__all__ = ["explain", "load_model", "recorder"]


def load_model(spec: Any) -> torch.nn.Module:
    """An nn.Module from a module, a tiny architecture name, ``smollm2``, a transformers folder
    (weights or GGUF), or a folder / ``config.json`` with only a config (random weights)."""
    from .models import ARCHITECTURES, load_smollm2, tiny_model

    if isinstance(spec, torch.nn.Module):
        return spec.eval()
    spec = str(spec)
    if spec in ARCHITECTURES:
        return tiny_model(spec)
    if spec.lower() in ("smollm2", "smollm2-135m"):
        return load_smollm2()[0]
    folder = Path(spec)
    if folder.is_file() and folder.name.endswith(".json"):  # a config alone: random weights
        folder = folder.parent
    if folder.is_dir():
        from transformers import AutoConfig, AutoModelForCausalLM

        ggufs = sorted(folder.glob("*.gguf"))
        weights = ggufs or [*folder.glob("*.safetensors"), *folder.glob("*.bin")]
        if not weights and (folder / "config.json").is_file():
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
        kwargs = {"gguf_file": ggufs[0].name} if ggufs else {}
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    raise ValueError(f"cannot load model {spec!r}: give an nn.Module, a tiny architecture "
                     f"({', '.join(sorted(ARCHITECTURES))}), 'smollm2' or a transformers folder")


def _default_inputs(model: torch.nn.Module, prompt_len: int) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(model, "config", None), "vocab_size", 256)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=generator)
    return {"input_ids": ids, "use_cache": False}


def recorder(recipe: Recipe, reports: list[Report], *, lower: bool = False,
             tokenizer: Any = None) -> Callable:
    """A Dynamo backend running the backend's capture and pipeline (and the lowering when
    ``lower``) on every graph, appending its report to ``reports``, and then running the graph
    uncompiled (falling back where the pipeline would)."""
    from ..backend import compile_graph

    def backend(gm, inputs, **_):
        flags = {"fallback": True, "tokenizer": tokenizer}
        reports.append(compile_graph(gm, inputs, recipe, flags, lower=lower)[1])
        return gm.forward
    return backend


def explain(model: Any, recipe: Any = None, example_inputs: Any = None, prompt_len: int = 16,
            *, lower: bool | None = None, tokenizer: Any = None) -> list[Report]:
    """Reports (one per captured graph) of what ``recipe`` does to ``model``, fallbacks
    included; ``lower`` (default: only for target ``onnxruntime``) also runs the lowering."""
    recipe = resolve_recipe(recipe)
    module = load_model(model)
    lower = recipe.target == "onnxruntime" if lower is None else lower
    if tokenizer is None:
        tokenizer = _compat.tokenizer_path(module)
    reports: list[Report] = []
    backend = recorder(recipe, reports, lower=lower, tokenizer=tokenizer)
    torch.compiler.reset()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    kwargs = example_inputs if example_inputs is not None else _default_inputs(module, prompt_len)
    try:
        with torch.no_grad():
            if isinstance(kwargs, dict):
                compiled(**kwargs)
            else:
                compiled(*kwargs)
    except Exception as e:
        inner = getattr(e, "inner_exception", None)  # Dynamo wraps what a backend raises
        if isinstance(inner, RecipeError):
            raise inner from None
        raise
    finally:
        torch.compiler.reset()
    return reports
