"""The pipeline: which passes exist, and the one fixed order their phases run in.

    canonicalize -> fuse -> sparse_attention -> quantize -> early_exit -> cleanup

``canonicalize`` and ``cleanup`` (weight folding, dead code) always run; the recipe chooses
the passes in between. Passes of one phase run in recipe order.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from .canonicalize import canonicalize
from .fold import eliminate_dead_code, fold_weights
from .program import Program
from .recipe import PassConfig, Recipe, RecipeError
from .rewrite import Stats
from .rules import RuleSet

log = logging.getLogger("llmcompile")
aten_embedding = torch.ops.aten.embedding.default

__all__ = ["PHASES", "PassRun", "Report", "UserRules", "run_pipeline"]

#: early_exit cuts layers before fusion, while every layer boundary is still one value
PHASES = ("canonicalize", "early_exit", "fuse", "sparse_attention", "quantize", "cleanup")


@dataclass(frozen=True)
class UserRules(PassConfig):
    """Your own rules in a recipe: ``ref`` names a RuleSet as ``"package.module:ATTR"``.

    In Python, pass the rule set itself: ``UserRules(rules=MY_RULES, at="fuse")``.
    """

    name: ClassVar[str] = "rules"
    ref: str = ""
    at: str = "fuse"
    rules_obj: object = field(default=None, compare=False, repr=False)

    def __init__(self, ref: str = "", at: str = "fuse", rules: RuleSet | None = None):
        object.__setattr__(self, "ref", ref)
        object.__setattr__(self, "at", at)
        object.__setattr__(self, "rules_obj", rules)
        self.__post_init__()

    @property
    def phase(self) -> str:  # type: ignore[override]
        return self.at

    def validate(self) -> None:
        if self.at not in (*PHASES[1:-1], "post_grad"):
            raise RecipeError(f"rules.at: {self.at!r} is not a rule phase; valid: "
                              f"{', '.join(PHASES[1:-1])}, post_grad")
        if self.rules_obj is None and not self.ref:
            raise RecipeError("rules: give ref='package.module:ATTR' (or rules=RuleSet in Python)")
        if self.rules_obj is None:
            self.rules()  # import now: a bad reference fails before compiling
        elif not isinstance(self.rules_obj, RuleSet):
            raise RecipeError(f"rules: expected a RuleSet, got {type(self.rules_obj).__name__}")

    def rules(self) -> RuleSet:
        if self.rules_obj is not None:
            return self.rules_obj
        module, _, attr = self.ref.partition(":")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError, ValueError) as e:
            raise RecipeError(f"rules: cannot import {self.ref!r}: {e}") from None
        if not isinstance(found, RuleSet):
            raise RecipeError(f"rules: {self.ref!r} is a {type(found).__name__}, not a RuleSet")
        return found

    def to_dict(self):
        if not self.ref:
            raise RecipeError("rules given as a Python object cannot be written out; "
                              "use ref='package.module:ATTR'")
        return {"name": self.name, "ref": self.ref, "at": self.at}

    def fingerprint(self) -> str:
        rules = self.rules()
        return f"rules:{self.at}:{rules.name}:{','.join(rules.names)}"


@dataclass
class PassRun:
    phase: str
    name: str
    stats: Stats
    seconds: float
    #: what the pass changed in cost (``analysis.delta.CostDelta``), when an observer ran
    cost: Any = None


@dataclass
class Report:
    """What the pipeline did: per pass, which rules fired and why others declined."""

    recipe: str
    runs: list[PassRun] = field(default_factory=list)
    folded: int = 0
    #: bytes of weights the rewritten graph reads (packed constants + weights still used)
    weight_bytes: int = 0
    #: nodes of the rewritten graph (its size: what the lowering compiles)
    nodes: int = 0
    #: why this graph runs on plain Inductor instead of the recipe (None: it did not fall back)
    fallback: str | None = None
    #: where the fallback happened: "capture", "pipeline" or "lower"
    fallback_stage: str | None = None
    #: the whole recipe's cost change (``analysis.delta.CostDelta``: ``.after`` is the final
    #: graph's cost), when an observer ran
    cost: Any = None

    def fired(self, rule: str) -> int:
        return sum(r.stats.fired(rule) for r in self.runs)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for run in self.runs:
            for name, s in run.stats.rules.items():
                out[name] = out.get(name, 0) + s.fired
        return out

    def format(self, misses: int = 3, quiet: bool = True) -> str:
        """A readable summary; ``quiet`` hides rules that neither fired nor nearly matched."""
        lines = [f"recipe {self.recipe!r}" + (f", {self.nodes} nodes" if self.nodes else "")]
        for run in self.runs:
            lines.append(f"  [{run.phase}] {run.name}  ({run.seconds * 1000:.0f} ms)")
            if run.cost is not None:
                lines.append(f"      cost: {run.cost}")
            lines += [f"      note: {note}" for note in run.stats.notes]
            for name, s in run.stats.rules.items():
                if quiet and not s.fired and not s.near_misses:
                    continue
                lines.append(f"      {name:<28} fired {s.fired:>4}")
                for node, why in s.near_misses[:misses]:
                    lines.append(f"          near miss at %{node}: {why}")
                if len(s.near_misses) > misses:
                    lines.append(f"          ... {len(s.near_misses) - misses} more near misses")
        lines.append(f"  [cleanup] {self.folded} weight subgraphs folded into constants")
        if self.cost is not None:
            lines.append(f"  cost of the recipe: {self.cost}")
        if self.fallback:
            lines.append(f"  FALLBACK ({self.fallback_stage}): this graph runs on plain Inductor "
                         f"without the recipe: {self.fallback}")
        return "\n".join(lines)


def _ordered(recipe: Recipe) -> list[PassConfig]:
    """The recipe's graph passes in phase order (post_grad rules run inside Inductor)."""
    graph_passes = [p for p in recipe.passes if p.phase in PHASES]
    return sorted(graph_passes, key=lambda p: PHASES.index(p.phase))


def _dump(program: Program, step: str, index: int) -> None:
    folder = os.environ.get("LLMCOMPILE_DUMP")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{index:02d}-{step}.txt").write_text(str(program.graph))


def run_pipeline(program: Program, recipe: Recipe,
                 observe: Callable[[Program, str], Any] | None = None) -> Report:
    """Run every phase of ``recipe`` on ``program`` in place; returns the report.

    ``observe(program, step)`` (e.g. ``analysis.delta.CostObserver``) is called after
    canonicalization, after each pass (its result goes to ``PassRun.cost``) and after cleanup
    (``Report.cost``).
    """
    report = Report(recipe.name)
    canonicalize(program.graph)
    _dump(program, "canonicalize", 0)
    if observe is not None:
        observe(program, "canonicalize")
    for i, config in enumerate(_ordered(recipe), start=1):
        start = time.perf_counter()
        stats = Stats()
        config.run(program, stats)
        report.folded += fold_weights(program)  # later phases see folded weights as weights
        report.runs.append(PassRun(config.phase, config.name, stats,
                                   time.perf_counter() - start,
                                   observe(program, config.name) if observe else None))
        _dump(program, f"{config.phase}-{config.name}", i)
    report.folded += fold_weights(program)
    eliminate_dead_code(program.graph)
    program.recompile()
    report.weight_bytes = _weight_bytes(program)
    report.nodes = len(program.graph.nodes)
    if observe is not None:
        report.cost = observe(program, "cleanup")
    _dump(program, "cleanup", len(recipe.passes) + 1)
    return report


def _weight_bytes(program: Program) -> int:
    seen: set[int] = set()
    total = 0
    for node in program.graph.nodes:
        if not node.users or not program.is_weight(node):
            continue
        if all(u.target is aten_embedding and u.args[0] is node for u in node.users):
            continue  # a gather reads a few rows, not the table
        tensor = program.weight(node)
        if tensor is not None and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
