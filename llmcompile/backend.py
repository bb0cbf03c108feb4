"""``backend="llmcompile"``: the torch.compile entry point (registered by entry point).

    model.forward = torch.compile(model.forward, backend="llmcompile",
                                  options={"recipe": "default"})

Options: ``recipe`` (a Recipe, dict, preset name or .toml path), ``target`` (overrides the
recipe's), ``fallback`` (default True: a graph the pipeline cannot handle is compiled by plain
Inductor with one logged warning; False raises instead), ``debug`` (log the pass report).
``tokenizer`` (a tokenizer or its path) tokenizes calibration text for calibrated passes.
Target ``onnxruntime`` runs the rewritten graph in an ONNX Runtime session (contrib ops,
CUDA provider with IO binding on a GPU, else the CPU provider); target ``eager`` runs it
without Inductor (debugging, quick quality checks).
Recipe mistakes always raise, before any graph is compiled.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.fx as fx

from .lower.inductor import compile_inductor, plain_inductor
from .pipeline import Report, UserRules, run_pipeline
from .program import capture_dynamo
from .recipe import Recipe, RecipeError, resolve_recipe
from .rules import RuleSet

log = logging.getLogger("llmcompile")

__all__ = ["OPTIONS", "llmcompile_backend", "collect_reports"]

OPTIONS = ("recipe", "target", "fallback", "debug", "tokenizer")

_collector: contextvars.ContextVar[list | None] = contextvars.ContextVar("llmc_reports",
                                                                           default=None)
_warned: set[str] = set()


class collect_reports:
    """Context manager collecting the :class:`Report` of every graph compiled inside it."""

    def __enter__(self) -> list[Report]:
        self.reports: list[Report] = []
        self._token = _collector.set(self.reports)
        return self.reports

    def __exit__(self, *exc) -> None:
        _collector.reset(self._token)


def parse_options(options: Mapping[str, Any] | None) -> tuple[Recipe, dict[str, Any]]:
    """Validate backend options; returns the recipe and the remaining flags."""
    options = dict(options or {})
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise RecipeError(f"unknown llmcompile option(s) {sorted(unknown)}; valid: "
                          f"{', '.join(OPTIONS)}")
    recipe = resolve_recipe(options.get("recipe"))
    if "target" in options:
        recipe = dataclasses.replace(recipe, target=options["target"])
    flags = {"fallback": options.get("fallback", True), "tokenizer": options.get("tokenizer"),
             "debug": options.get("debug", os.environ.get("LLMCOMPILE_DEBUG", "") not in ("",
                                                                                           "0"))}
    for key in ("fallback", "debug"):
        if not isinstance(flags[key], bool):
            raise RecipeError(f"option {key!r} must be true or false, got {flags[key]!r}")
    return recipe, flags


def _post_grad_rules(recipe: Recipe) -> RuleSet | None:
    rules = [r for p in recipe.passes if isinstance(p, UserRules) and p.at == "post_grad"
             for r in p.rules()]
    return RuleSet("post_grad", rules) if rules else None


def _fallback(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None,
              cause: BaseException) -> Callable:
    message = f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
    if message not in _warned:
        _warned.add(message)
        log.warning("llmcompile: falling back to plain Inductor for this graph: %s", message)
    return plain_inductor(gm, example_inputs, mode)


def llmcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                       options: Mapping[str, Any] | None = None, mode: str | None = None
                       ) -> Callable:
    """The Dynamo backend: capture -> rewrite (recipe) -> lower."""
    recipe, flags = parse_options(options)
    try:
        program = capture_dynamo(gm, example_inputs)
        program.context["tokenizer"] = flags["tokenizer"]
        program.context["target"] = recipe.target
        report = run_pipeline(program, recipe)
    except RecipeError:
        raise
    except Exception as e:
        if not flags["fallback"]:
            raise
        return _fallback(gm, example_inputs, mode, e)
    if flags["debug"]:
        log.warning("llmcompile pass report:\n%s", report.format())
    sink = _collector.get()
    if sink is not None:
        sink.append(report)
    if recipe.target == "eager":
        return program.gm
    try:
        if recipe.target == "onnxruntime":
            from .lower.onnxruntime import compile_onnxruntime

            return compile_onnxruntime(program, example_inputs, fingerprint=recipe.fingerprint())
        return compile_inductor(program, example_inputs, mode=mode,
                                post_grad=_post_grad_rules(recipe),
                                fingerprint=recipe.fingerprint())
    except Exception as e:
        if not flags["fallback"]:
            raise
        return _fallback(gm, example_inputs, mode, e)
