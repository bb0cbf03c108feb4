"""Declarative rules: a pattern, a replacement with the same parameters, an optional check.

```python
def decomposed(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

def fused(x, w, eps: float):
    return ops.rms_norm(x, w, eps)

RULES = RuleSet("norms", [Rule("rmsnorm", decomposed, fused, check=eps_is_constant)])
```

The engine (:mod:`llmcompile.core.rewrite`) owns all graph surgery; rule files never touch fx.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from .pattern import Pattern

__all__ = ["Match", "Reject", "Rule", "RuleSet"]


@dataclass(frozen=True)
class Reject:
    """Returned by a rule's check to decline a match; ``reason`` is shown to users."""

    reason: str


class Match:
    """What a check sees: the bound wildcards and the matched graph nodes."""

    def __init__(self, rule: Rule, nodes: dict[fx.Node, fx.Node], binds: dict[str, Any],
                 program=None):
        self.rule = rule
        self._nodes = nodes  # pattern node -> graph node
        self.binds = binds
        self.program = program

    def __getitem__(self, name: str) -> Any:
        if name not in self.binds:
            raise KeyError(f"rule {self.rule.name!r} has no parameter {name!r}; "
                           f"known: {sorted(self.binds)}")
        return self.binds[name]

    @property
    def nodes(self) -> list[fx.Node]:
        """The matched graph nodes (ops only, not the bound inputs)."""
        return list(self._nodes.values())

    @property
    def anchor(self) -> fx.Node:
        return self._nodes[self.rule.pattern.outputs[0]]

    @property
    def outputs(self) -> list[fx.Node]:
        return [self._nodes[o] for o in self.rule.pattern.outputs]

    def op(self, target) -> list[fx.Node]:
        """Matched graph nodes calling ``target`` (an OpOverload), in pattern order."""
        return [g for p, g in self._nodes.items() if p.target == target]

    def is_constant(self, name: str) -> bool:
        """True when a wildcard is bound to a compile-time constant (not a graph value)."""
        return not isinstance(self[name], fx.Node)

    def val(self, name: str) -> Any:
        """The fake value (``meta["val"]``) of a bound tensor, or the constant itself."""
        v = self[name]
        return v.meta.get("val") if isinstance(v, fx.Node) else v

    def shape(self, name: str) -> tuple:
        return tuple(self.val(name).shape)

    def dtype(self, name: str) -> torch.dtype:
        return self.val(name).dtype

    def is_weight(self, name: str) -> bool:
        """True when the wildcard is bound to a model weight (or a folded constant)."""
        return self.program is not None and self.program.is_weight(self[name])

    def weight(self, name: str) -> torch.Tensor | None:
        """The real tensor of a weight wildcard (None when it is not a weight)."""
        v = self[name]
        if self.program is None or not isinstance(v, fx.Node):
            return None
        return self.program.weight(v)

    @property
    def module_path(self) -> str:
        """The module the anchor node was traced in (``model.layers.3.self_attn``)."""
        if self.program is None:
            return ""
        return self.program.module_path(self.anchor)

    def weight_source(self, name: str) -> str:
        """Module path of a weight wildcard (``model.layers.0.mlp.up_proj.weight``)."""
        v = self[name]
        if self.program is None or not isinstance(v, fx.Node):
            return ""
        return self.program.sources.get(v.name, v.name)


Check = Callable[[Match], "Reject | Mapping[str, Any] | None"]


class Rule:
    """A rewrite ``pattern ==> replacement`` with an optional ``check``.

    * ``pattern`` and ``replacement`` are plain functions with the same parameters; parameters
      annotated ``float``/``int`` match any constant at that position.
    * ``check(match)`` returns ``Reject(reason)`` to decline, ``None`` to accept, or a dict of
      extra keyword arguments for the replacement (values decided from the match: constants,
      compile-time tensors, or graph nodes, e.g. the tensor behind a chain of views, which
      then stand for a tensor parameter).
    * ``example`` gives tensor shapes (or tensors) for tracing the pattern.
    """

    def __init__(self, name: str, pattern: Callable, replacement: Callable,
                 check: Check | None = None, *, example: Mapping[str, Any] | None = None,
                 description: str = ""):
        if not name or not isinstance(name, str):
            raise ValueError("a rule needs a non-empty name")
        self.name = name
        self.pattern_fn = pattern
        self.replacement = replacement
        self.check = check
        self.example = dict(example or {})
        self.description = description or (pattern.__doc__ or "").strip().split("\n")[0]
        self._pattern: Pattern | None = None

    @property
    def pattern(self) -> Pattern:
        """The traced pattern (traced on first use, then cached)."""
        if self._pattern is None:
            self._pattern = Pattern(self.pattern_fn, self.example)
        return self._pattern

    def __repr__(self) -> str:
        return f"Rule({self.name!r})"


class RuleSet:
    """An ordered, named collection of rules (rules apply in this order)."""

    def __init__(self, name: str, rules: Iterable[Rule] = ()):
        self.name = name
        self.rules: list[Rule] = list(rules)
        names = [r.name for r in self.rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"rule set {name!r} has duplicate rule names {sorted(dup)}")

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def __add__(self, other: RuleSet) -> RuleSet:
        return RuleSet(f"{self.name}+{other.name}", [*self.rules, *other.rules])

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]

    def select(self, include: Iterable[str] = ("*",), exclude: Iterable[str] = ()) -> RuleSet:
        """The rules whose names match any ``include`` glob and no ``exclude`` glob."""
        include, exclude = list(include), list(exclude)
        for pat in [*include, *exclude]:
            if not any(fnmatch.fnmatchcase(n, pat) for n in self.names):
                raise ValueError(f"no rule in {self.name!r} matches {pat!r}; "
                                 f"valid: {', '.join(self.names)}")
        keep = [r for r in self.rules
                if any(fnmatch.fnmatchcase(r.name, p) for p in include)
                and not any(fnmatch.fnmatchcase(r.name, p) for p in exclude)]
        return RuleSet(self.name, keep)
