"""Patterns: plain Python functions traced once into the canonical IR.

A pattern parameter annotated ``float`` / ``int`` / ``bool`` is a *scalar wildcard*: it is traced
with a unique sentinel value, and any constant (or scalar node) at that position matches and is
bound to the parameter's name. Every other parameter is a tensor wildcard. Tensor parameters are
traced on small example tensors; give shapes where the math needs them
(``example={"w": (16, 8)}``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from .canonicalize import canonicalize

__all__ = ["Pattern", "PatternError", "arguments"]

_SCALAR_TYPES = {"float": float, "int": int, float: float, int: int}
_DEFAULT_SHAPE = (2, 3, 4, 8)


class PatternError(ValueError):
    """A pattern or replacement function that cannot be traced into a usable rule."""


def _scalar_kind(name: str, annotation: Any) -> type | None:
    if isinstance(annotation, str):
        annotation = annotation.strip()
    if annotation in (bool, "bool"):
        raise PatternError(f"parameter {name!r}: bool wildcards are not supported; write one "
                           "pattern per value or decide in the rule's check")
    return _SCALAR_TYPES.get(annotation)


def _sentinel(kind: type, index: int):
    if kind is float:
        return 0.0123456789 + 1e-7 * index
    return 1000003 + index


def arguments(node: fx.Node) -> list[Any]:
    """All arguments of a call in schema order, defaults filled in (so spellings compare)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return [*node.args, *(node.kwargs[k] for k in sorted(node.kwargs))]
    out = []
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            out.append(node.args[i])
        elif arg.name in node.kwargs:
            out.append(node.kwargs[arg.name])
        elif arg.has_default_value():
            out.append(arg.default_value)
        else:
            out.append(None)
    return out


@dataclass
class Param:
    name: str
    scalar: type | None  # None for tensors
    sentinel: Any = None


class Pattern:
    """A traced, canonicalized pattern graph with named wildcards."""

    def __init__(self, fn: Callable, example: Mapping[str, Any] | None = None):
        self.fn = fn
        self.params: list[Param] = []
        sig = inspect.signature(fn)
        for i, (name, p) in enumerate(sig.parameters.items()):
            kind = _scalar_kind(name, p.annotation)
            self.params.append(Param(name, kind, _sentinel(kind, i) if kind else None))
        self.example = dict(example or {})
        unknown = set(self.example) - {p.name for p in self.params}
        if unknown:
            raise PatternError(f"{fn.__name__}: example names unknown parameters {sorted(unknown)}")
        self.graph, self.placeholders, self.outputs = self._trace()
        self.sentinels = {p.sentinel: p.name for p in self.params if p.scalar is not None}
        self._check_scalars_used()
        self.ops = [n for n in self.graph.nodes if n.op == "call_function"]

    @property
    def name(self) -> str:
        return getattr(self.fn, "__name__", "pattern")

    def tensor_params(self) -> list[str]:
        return [p.name for p in self.params if p.scalar is None]

    def example_tensor(self, name: str) -> torch.Tensor:
        spec = self.example.get(name, _DEFAULT_SHAPE)
        if isinstance(spec, torch.Tensor):
            return spec
        return torch.randn(*spec)

    def _trace(self):
        tensors = [p for p in self.params if p.scalar is None]
        scalars = {p.name: p.sentinel for p in self.params if p.scalar is not None}
        fake_mode = _compat.fake_mode_for([])
        with fake_mode:
            fakes = [fake_mode.from_tensor(self.example_tensor(p.name)) for p in tensors]

        def call(*ts):
            kwargs = dict(zip([p.name for p in tensors], ts))
            return self.fn(**kwargs, **scalars)

        try:
            gm = _compat.trace_aten(call, fakes, fake_mode)
        except Exception as e:  # the user's function failed on its example inputs
            raise PatternError(
                f"pattern {self.name!r} could not be traced on example shapes "
                f"{ {p.name: tuple(f.shape) for p, f in zip(tensors, fakes)} }: {e}; "
                f"pass example={{name: shape}} to the Rule"
            ) from e
        canonicalize(gm.graph)
        gm.graph.eliminate_dead_code()
        placeholders = {}
        for p, node in zip(tensors, [n for n in gm.graph.nodes if n.op == "placeholder"]):
            if not node.users:
                raise PatternError(f"pattern {self.name!r}: parameter {p.name!r} is not used")
            placeholders[node] = p.name
        out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        outputs = list(out) if isinstance(out, (tuple, list)) else [out]
        for o in outputs:
            if not isinstance(o, fx.Node) or o.op != "call_function":
                raise PatternError(f"pattern {self.name!r}: every output must be computed by an op")
        return gm.graph, placeholders, outputs

    def _check_scalars_used(self) -> None:
        seen: set[Any] = set()
        for node in self.graph.nodes:
            for value in fx.node.map_aggregate((node.args, node.kwargs), lambda v: v):
                _collect(value, seen)
        for value, name in self.sentinels.items():
            if value not in seen:
                raise PatternError(
                    f"pattern {self.name!r}: scalar parameter {name!r} does not appear verbatim "
                    "in the traced graph (was it used in Python arithmetic? keep it as an op "
                    "argument, e.g. x * scale, not x * (1 / scale))"
                )


def _collect(value: Any, seen: set) -> None:
    if isinstance(value, Mapping):  # keyword arguments
        _collect(list(value.values()), seen)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _collect(v, seen)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seen.add(value)
