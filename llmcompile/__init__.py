"""llmcompile: a declarative torch.compile plugin that makes LLM inference cheaper.

    model.forward = torch.compile(model.forward, backend="llmcompile",
                                  options={"recipe": "default"})

Public API (everything else may move):
  compile, explain          -- compile a model / callable, or report what the rules would do
  cost                      -- closed-form FLOPs / bytes of prefill and decode, predicted speed
  generate                  -- greedy generation through compiled graphs (self-speculative with
                               an early-exit recipe); prompt + new token ids, like HF generate
  export                    -- write an ONNX file (KV-cache I/O, contrib ops) for deployment
  save_artifacts, load_artifacts -- ship compiled graphs + quantized weights (warm start)
  OnnxCausalLM              -- run such a file (greedy generation) with onnxruntime
  SinkCache                 -- a bounded KV cache (attention sinks + sliding window) for generate
  Recipe, RecipeError, load_recipe, presets
  Rule, RuleSet, Reject, Match, UserRules   -- write your own rules
  ops                       -- the fused ops rules introduce (torch.ops.llmcompile.*)
  testing                   -- check_rewrite / assert_declines for rule unit tests
"""

from __future__ import annotations

from typing import Any

from . import ops
from ._compat import tokenizer_path as _tokenizer_path
from .core.pipeline import Report, UserRules
from .core.recipe import PassConfig, Recipe, RecipeError
from .core.rules import Match, Reject, Rule, RuleSet
from .registry import presets
from .registry import resolve_recipe as load_recipe

__version__ = "0.1.0"

__all__ = [
    "Match", "PassConfig", "Recipe", "RecipeError", "Reject", "Report", "Rule", "RuleSet",
    "OnnxCausalLM", "SinkCache", "UserRules", "compile", "cost", "explain", "export",
    "generate", "load_artifacts",
    "load_recipe", "ops", "presets", "save_artifacts",
]


def compile(model: Any, recipe: Any = None, *, target: str | None = None,
            tokenizer: Any = None, **torch_compile_kwargs):
    """``torch.compile(model, backend="llmcompile")``, validating the recipe eagerly.

    Recipe errors raise here, before anything is traced. ``tokenizer`` (or its path) is used by
    calibrated passes; when omitted it is looked up from a transformers model's config.
    """
    import torch

    options: dict[str, Any] = {"recipe": load_recipe(recipe)}
    if target is not None:
        options["target"] = target
    tokenizer = tokenizer if tokenizer is not None else _tokenizer_path(model)
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    from .backend import parse_options

    parse_options(options)
    from .quant.calibrate import register_model

    register_model(model)  # calibrated passes run it on their own text
    return torch.compile(model, backend="llmcompile", options=options, **torch_compile_kwargs)


def export(model: Any, path: Any, recipe: Any = None, **kwargs: Any):
    """Export a causal LM rewritten by ``recipe`` to an ONNX file (KV-cache I/O, contrib ops):
    ``model`` is an ``nn.Module``, ``"smollm2"``, a tiny architecture name or a transformers
    folder; see :func:`llmcompile.deploy.export.export`."""
    from .deploy.export import export as _export
    from .tools.explain import load_model

    return _export(load_model(model), path, load_recipe(recipe), **kwargs)


def generate(model: Any, input_ids: Any, recipe: Any = None, *, max_new_tokens: int = 32,
             eos_token_id: int | None = None, tokenizer: Any = None,
             return_stats: bool = False):
    """Greedy generation through ``model``'s graphs compiled under ``recipe`` (compiled once
    per model and recipe, then reused): the prompt and new token ids ``[1, prompt + new]``,
    like ``model.generate``. With an ``early_exit`` recipe it is self-speculative (the same
    tokens as the full model, drafted by the first layers) or confident early exit (lossy).
    ``return_stats``: also return :class:`~llmcompile.deploy.generate.GenerationStats`
    (tokens/s, acceptance rate, tokens per verification, layers per token)."""
    from .tools.generate import generate as _generate

    ids, stats = _generate(model, input_ids, recipe, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, tokenizer=tokenizer)
    return (ids, stats) if return_stats else ids


def save_artifacts(path: Any) -> dict[str, int]:
    """Write everything this process compiled (torch's compile caches, quantization artifacts,
    the CPU kernels' build) to a folder, for a warm start on another machine of the same kind;
    see :mod:`llmcompile.deploy.artifacts`."""
    from .deploy.artifacts import save_artifacts as _save

    return _save(path)


def load_artifacts(path: Any) -> dict[str, int]:
    """Load a folder written by :func:`save_artifacts` into this process's caches (before
    compiling)."""
    from .deploy.artifacts import load_artifacts as _load

    return _load(path)


def cost(model: Any, recipe: Any = None, **kwargs: Any):
    """The cost of ``model`` under ``recipe``: FLOPs, weight / KV / activation bytes of
    prefill(s) and decode(p) as sympy formulas, predicted TTFT / TPOT / MBU on this machine,
    and what each pass changed; see :func:`llmcompile.tools.cost.cost`."""
    from .tools.cost import cost as _cost

    return _cost(model, recipe, **kwargs)


def explain(model: Any, recipe: Any = None, example_inputs: Any = None) -> list[Report]:
    """Run the pipeline on ``model`` and return per-graph reports (rules fired, near misses).

    ``model`` is an ``nn.Module`` (a causal LM is fed a short prompt by default), a tiny
    architecture name (``"llama"``), or a transformers folder path.
    """
    from .tools.explain import explain as _explain

    return _explain(model, recipe, example_inputs)


def __getattr__(name: str):
    if name == "OnnxCausalLM":  # loads onnxruntime: only when asked for
        from .deploy.runner import OnnxCausalLM

        return OnnxCausalLM
    if name == "SinkCache":  # loads transformers: only when asked for
        from .deploy.sink_cache import SinkCache

        return SinkCache
    raise AttributeError(f"module 'llmcompile' has no attribute {name!r}")
