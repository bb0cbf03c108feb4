"""What each pass changed in cost: :class:`CostDelta`, and the pipeline observer computing it.

    fuse: activations -2155704*b*s; nodes +60 llmcompile.add_rms_norm, -272 mul, ...
    quantize_weights: weight bytes 538060160 -> 173106560; per layer 13.50 MiB -> 4.37 MiB
                      (layers 0-29); nodes -120 linear, +120 llmcompile.int4_linear
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sympy

from .cost import Cost, GraphCost, graph_cost

log = logging.getLogger("llmcompile")

__all__ = ["CostDelta", "CostObserver"]


def _amount(value: Any, unit: str = "B") -> str:
    """A byte count or a formula, readable."""
    value = sympy.nsimplify(value) if isinstance(value, float) else value
    if isinstance(value, sympy.Basic) and value.free_symbols:
        return str(sympy.expand(value))
    value = float(value)
    if unit != "B":
        return f"{value:.3g}"
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {name}"
    return f"{value:.0f} B"


@dataclass
class CostDelta:
    """What one pass (or the whole recipe) changed: costs before and after, node counts."""

    before: GraphCost
    after: GraphCost

    def change(self) -> Cost:
        return (self.after.total() - self.before.total()).simplify()

    def ops(self) -> dict[str, int]:
        counts = self.after.op_counts()
        counts.subtract(self.before.op_counts())
        return {op: n for op, n in sorted(counts.items()) if n}

    def layers(self) -> dict[int | None, tuple[Any, Any]]:
        """Weight bytes per decoder layer (None: outside the layers), before and after."""
        out: dict[int | None, list] = {}
        for i, graph in enumerate((self.before, self.after)):
            for n in graph.nodes:
                out.setdefault(n.layer, [0, 0])[i] += n.cost.weights
        return {k: (v[0], v[1]) for k, v in out.items()}

    def _layer_weights(self) -> list[str]:
        """``per layer 17.0 MiB -> 5.3 MiB (layers 0-29)``: layers grouped by equal change."""
        groups: dict[tuple, list[int]] = {}
        for layer, (old, new) in sorted(self.layers().items(), key=lambda kv: (
                kv[0] is None, kv[0] or 0)):
            if layer is not None and sympy.simplify(old - new) != 0:
                groups.setdefault((old, new), []).append(layer)
        return [f"per layer {_amount(old)} -> {_amount(new)} (layers "
                f"{_spans(layers)})" for (old, new), layers in groups.items()]

    def __str__(self) -> str:
        a, b = self.after.total(), self.before.total()
        parts = []
        if sympy.simplify(a.weights - b.weights) != 0:
            parts.append(f"weight bytes {_amount(b.weights)} -> {_amount(a.weights)}")
            parts += self._layer_weights()
        for name in ("kv", "activations", "flops"):
            diff = sympy.expand(getattr(a, name) - getattr(b, name))
            if diff != 0:
                unit = "" if name == "flops" else "B"
                parts.append(f"{name} {'+' if _positive(diff) else ''}{_amount(diff, unit)}")
        ops = ", ".join(f"{n:+d} {op}" for op, n in self.ops().items())
        if ops:
            parts.append(f"nodes {ops}")
        if self.after.partial:
            parts.append(f"unknown ops {dict(self.after.unknown)}")
        return "; ".join(parts) or "no change"


def _spans(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans)


def _positive(value: Any) -> bool:
    return not (isinstance(value, sympy.Basic) and value.free_symbols) and float(value) > 0


class CostObserver:
    """Hands :func:`~llmcompile.core.pipeline.run_pipeline` the cost delta of each step."""

    def __init__(self, rename: Mapping | None = None):
        self.rename = dict(rename or {})
        self.first: GraphCost | None = None
        self.last: GraphCost | None = None
        self.failed = False

    def __call__(self, program, step: str) -> CostDelta | None:
        if self.failed:
            return None
        try:
            now = graph_cost(program.graph, program.is_weight, self.rename, program.module_path)
        except Exception as e:  # noqa: BLE001 - a diagnostic must never break a compile
            log.warning("llmcompile: the cost model failed on this graph (%s: %s); its "
                        "report has no cost", type(e).__name__, e)
            self.failed = True
            return None
        if self.first is None:
            self.first = self.last = now
            return None
        before = self.first if step == "cleanup" else self.last
        self.last = now
        return CostDelta(before, now)
