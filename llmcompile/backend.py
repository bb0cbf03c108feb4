"""``backend="llmcompile"``: the torch.compile entry point (registered by entry point).

    model.forward = torch.compile(model.forward, backend="llmcompile",
                                  options={"recipe": "default"})

Options: ``recipe`` (a Recipe, dict, preset name or .toml path), ``target`` (overrides the
recipe's), ``fallback`` (default True: a graph the pipeline or the target cannot handle is
compiled by plain Inductor, with a logged warning and a report that says why; ``False`` or
``"error"`` raises instead), ``verify`` (check the first call of every compiled graph against
the uncompiled graph; a mismatch raises :class:`~llmcompile.core.verify.VerificationError`),
``debug`` (log the pass report). ``tokenizer`` (a tokenizer or its path) tokenizes calibration
text for calibrated passes.
Target ``onnxruntime`` runs the rewritten graph in an ONNX Runtime session (contrib ops,
CUDA provider with IO binding on a GPU, else the CPU provider); target ``eager`` runs it
without Inductor (debugging, quick quality checks).
Recipe mistakes always raise, before any graph is compiled.
"""

from __future__ import annotations

import contextvars
import dataclasses
import itertools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch.fx as fx

from .analysis.delta import CostObserver
from .core import stages
from .core.pipeline import Report, UserRules, run_pipeline
from .core.program import Collector, capture_dynamo, mutated_inputs, publish_compiled
from .core.recipe import Recipe, RecipeError
from .core.rules import RuleSet
from .core.verify import verified
from .lower.inductor import compile_inductor, plain_inductor
from .registry import resolve_recipe

log = logging.getLogger("llmcompile")

__all__ = ["OPTIONS", "collect_reports", "fallbacks", "llmcompile_backend"]

OPTIONS = ("recipe", "target", "fallback", "verify", "debug", "tokenizer", "cpp_wrapper")

_collector: contextvars.ContextVar[list | None] = contextvars.ContextVar("llmc_reports",
                                                                           default=None)
_graph_ids = itertools.count()
_fallbacks: list[Report] = []  # every graph that fell back in this process


class collect_reports(Collector):
    """Context manager collecting the :class:`Report` of every graph compiled inside it."""

    def __init__(self):
        super().__init__(_collector)


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
    fallback = options.get("fallback", True)
    if fallback == "error":
        fallback = False
    flags = {"fallback": fallback, "tokenizer": options.get("tokenizer"),
             "verify": options.get("verify", False),
             "cpp_wrapper": options.get("cpp_wrapper", False),
             "debug": options.get("debug", os.environ.get("LLMCOMPILE_DEBUG", "") not in ("",
                                                                                           "0"))}
    for key in ("fallback", "verify", "debug", "cpp_wrapper"):
        if not isinstance(flags[key], bool):
            extra = " (or 'error')" if key == "fallback" else ""
            raise RecipeError(f"option {key!r} must be true or false{extra}, got "
                              f"{flags[key]!r}")
    return recipe, flags


def fallbacks() -> list[Report]:
    """The report of every graph that fell back to plain Inductor in this process."""
    return list(_fallbacks)


def _post_grad_rules(recipe: Recipe) -> RuleSet | None:
    rules = [r for p in recipe.passes if isinstance(p, UserRules) and p.at == "post_grad"
             for r in p.rules()]
    return RuleSet("post_grad", rules) if rules else None


def _publish(report: Report) -> None:
    """Hand the report to the innermost :class:`collect_reports`, if any."""
    sink = _collector.get()
    if sink is not None:
        sink.append(report)


def compile_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], recipe: Recipe,
                  flags: Mapping[str, Any], mode: str | None = None, lower: bool = True
                  ) -> tuple[Callable | None, Report]:
    """capture -> rewrite (recipe) -> lower (unless ``lower`` is False: the rewritten graph
    module is returned). Where a step fails and ``flags["fallback"]`` is set, returns ``None``
    and a report whose ``fallback`` names the step and the cause; otherwise raises."""
    report, stage = Report(recipe.name), "capture"
    try:
        with stages.stage("capture"):
            program = capture_dynamo(gm, example_inputs)
        program.context["tokenizer"] = flags.get("tokenizer")
        program.context["target"] = recipe.target
        stage = "pipeline"
        with stages.stage("rewrite"):
            report = run_pipeline(program, recipe, observe=CostObserver())
        placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
        written = mutated_inputs(program.graph)
        mutated = [i for i, n in enumerate(placeholders) if n in written]
        stage = "lower"
        compiled = (_lower(program, example_inputs, recipe, mode, flags.get("cpp_wrapper", False))
                    if lower else program.gm)
    except RecipeError:
        raise
    except Exception as e:
        if not flags.get("fallback", True):
            raise
        report.fallback = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        report.fallback_stage = stage
        return None, report
    if flags.get("verify"):
        label = f"graph {next(_graph_ids)} (recipe {recipe.name!r}, target {recipe.target})"
        compiled = verified(compiled, gm, lossy=recipe.lossy, mutated=mutated, label=label)
    return compiled, report


def llmcompile_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                       options: Mapping[str, Any] | None = None, mode: str | None = None
                       ) -> Callable:
    """The Dynamo backend: capture -> rewrite (recipe) -> lower, or plain Inductor with a
    warning and a report that says why."""
    recipe, flags = parse_options(options)
    compiled, report = compile_graph(gm, example_inputs, recipe, flags, mode)
    if flags["debug"]:
        log.warning("llmcompile pass report:\n%s", report.format())
    _publish(report)
    if compiled is not None:
        publish_compiled(gm, example_inputs, compiled)
        return compiled
    _fallbacks.append(report)
    what = {"capture": "capturing the graph", "pipeline": f"recipe {report.recipe!r}",
            "lower": f"lowering to {recipe.target}"}[report.fallback_stage]
    log.warning("llmcompile: %s failed, so this graph runs on plain Inductor instead "
                "(fallback %d in this process; options={'fallback': False} raises): %s",
                what, len(_fallbacks), report.fallback)
    with stages.stage("inductor"):
        compiled = plain_inductor(gm, example_inputs, mode, cpp_wrapper=flags["cpp_wrapper"])
    publish_compiled(gm, example_inputs, compiled)
    return compiled


def _lower(program, example_inputs: Sequence[Any], recipe: Recipe, mode: str | None,
           cpp_wrapper: bool = False) -> Callable:
    if recipe.target == "eager":
        return program.gm
    if recipe.target == "onnxruntime":
        from .lower.onnxruntime import compile_onnxruntime

        return compile_onnxruntime(program, example_inputs, fingerprint=recipe.fingerprint())
    return compile_inductor(program, example_inputs, mode=mode,
                            post_grad=_post_grad_rules(recipe),
                            fingerprint=recipe.fingerprint(), cpp_wrapper=cpp_wrapper)
