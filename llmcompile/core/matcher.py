"""Structural matching of a :class:`Pattern` against a graph, with backtracking.

Matching is anchored at the pattern's first output and walks arguments upward. Commutative ops
are tried in both argument orders; scalar wildcards bind constants; every failure records why,
so the deepest failure becomes the near-miss reason the user sees.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .pattern import Pattern, arguments

aten = torch.ops.aten

__all__ = ["Failure", "State", "match_at"]

#: ops whose first two arguments may be swapped
COMMUTATIVE = {
    aten.add.Tensor, aten.mul.Tensor, aten.eq.Tensor, aten.ne.Tensor, aten.maximum.default,
    aten.minimum.default, aten.logical_and.default, aten.logical_or.default,
    aten.__and__.Tensor, aten.__or__.Tensor, aten.bitwise_and.Tensor, aten.bitwise_or.Tensor,
    operator.add, operator.mul,
}


@dataclass
class State:
    """A partial match: pattern op node -> graph node, and wildcard name -> binding."""

    nodes: dict[fx.Node, fx.Node] = field(default_factory=dict)
    binds: dict[str, Any] = field(default_factory=dict)

    def extend(self, pnode: fx.Node | None = None, gnode: fx.Node | None = None,
               name: str | None = None, value: Any = None) -> State:
        nodes, binds = dict(self.nodes), dict(self.binds)
        if pnode is not None:
            nodes[pnode] = gnode
        if name is not None:
            binds[name] = value
        return State(nodes, binds)


@dataclass
class Failure:
    """The deepest reason a match failed (depth = pattern nodes matched before it)."""

    depth: int = -1
    reason: str = ""

    def note(self, state: State, reason: str) -> None:
        if len(state.nodes) > self.depth:
            self.depth, self.reason = len(state.nodes), reason


def _describe(value: Any) -> str:
    if isinstance(value, fx.Node):
        if value.op == "call_function":
            return f"%{value.name} ({value.target})"
        return f"%{value.name}"
    return repr(value)


def _same_constant(p: Any, g: Any) -> bool:
    if isinstance(p, bool) or isinstance(g, bool):
        return p is g or (isinstance(p, bool) and isinstance(g, bool) and p == g)
    if isinstance(p, (int, float)) and isinstance(g, (int, float)):
        return p == g or (isinstance(p, float) and isinstance(g, float) and math.isclose(p, g))
    try:
        return type(p) is type(g) and p == g
    except Exception:
        return False


class _Matcher:
    def __init__(self, pattern: Pattern, failure: Failure):
        self.p = pattern
        self.fail = failure
        self.used: set[fx.Node] = set()

    def node(self, pn: fx.Node, g: Any, st: State) -> Iterator[State]:
        if pn in self.p.placeholders:
            yield from self.tensor_wildcard(self.p.placeholders[pn], g, st)
            return
        if not isinstance(g, fx.Node) or g.op != "call_function":
            self.fail.note(st, f"expected {pn.target} but found {_describe(g)}")
            return
        if pn in st.nodes:
            if st.nodes[pn] is g:
                yield st
            else:
                self.fail.note(st, f"{pn.target} must be one node, found two ({_describe(g)})")
            return
        if g.target != pn.target:
            self.fail.note(st, f"expected {pn.target} but found {_describe(g)}")
            return
        if g in st.nodes.values():
            self.fail.note(st, f"{_describe(g)} would match two pattern nodes")
            return
        st = st.extend(pn, g)
        pargs, gargs = arguments(pn), arguments(g)
        yield from self.seq(pargs, gargs, st)
        if pn.target in COMMUTATIVE and len(gargs) >= 2 and not _same_arg(gargs[0], gargs[1]):
            yield from self.seq(pargs, [gargs[1], gargs[0], *gargs[2:]], st)

    def tensor_wildcard(self, name: str, g: Any, st: State) -> Iterator[State]:
        if not isinstance(g, fx.Node):
            self.fail.note(st, f"{name!r} must be a tensor, found constant {g!r}")
            return
        if name in st.binds:
            if st.binds[name] is g:
                yield st
            else:
                self.fail.note(st, f"{name!r} is bound to %{st.binds[name].name} and "
                                   f"also to {_describe(g)}")
            return
        yield st.extend(name=name, value=g)

    def value(self, p: Any, g: Any, st: State) -> Iterator[State]:
        if isinstance(p, fx.Node):
            yield from self.node(p, g, st)
        elif isinstance(p, (list, tuple)):
            if not isinstance(g, (list, tuple)) or len(g) != len(p):
                self.fail.note(st, f"expected a list of {len(p)}, found {_describe(g)}")
                return
            yield from self.seq(list(p), list(g), st)
        elif isinstance(p, (int, float)) and not isinstance(p, bool) and p in self.p.sentinels:
            name = self.p.sentinels[p]
            if name in st.binds and not _same_arg(st.binds[name], g):
                self.fail.note(st, f"scalar {name!r} bound to {st.binds[name]!r} and {g!r}")
                return
            yield st.extend(name=name, value=g)
        elif isinstance(g, fx.Node) or not _same_constant(p, g):
            self.fail.note(st, f"expected constant {p!r}, found {_describe(g)}")
        else:
            yield st

    def seq(self, ps: list, gs: list, st: State, i: int = 0) -> Iterator[State]:
        if i == len(ps):
            yield st
            return
        if i >= len(gs):
            self.fail.note(st, "argument count differs")
            return
        for st2 in self.value(ps[i], gs[i], st):
            yield from self.seq(ps, gs, st2, i + 1)


def _same_arg(a: Any, b: Any) -> bool:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return a is b
    return _same_constant(a, b)


def _candidates(pattern: Pattern, index: int, st: State, by_target) -> list[fx.Node]:
    """Graph nodes that could match pattern output ``index`` (users of bound inputs first)."""
    pn = pattern.outputs[index]
    for arg in pn.all_input_nodes:
        name = pattern.placeholders.get(arg)
        if name in st.binds and isinstance(st.binds[name], fx.Node):
            return [u for u in st.binds[name].users if u.target == pn.target]
    return by_target.get(pn.target, [])


def match_at(pattern: Pattern, anchor: fx.Node, by_target: dict, failure: Failure
             ) -> Iterator[State]:
    """All complete matches of ``pattern`` whose first output is ``anchor``."""
    matcher = _Matcher(pattern, failure)

    def rest(index: int, st: State) -> Iterator[State]:
        if index == len(pattern.outputs):
            yield st
            return
        if pattern.outputs[index] in st.nodes:  # already matched inside an earlier output
            yield from rest(index + 1, st)
            return
        for g in _candidates(pattern, index, st, by_target):
            if g in st.nodes.values():
                continue
            for st2 in matcher.node(pattern.outputs[index], g, st):
                yield from rest(index + 1, st2)

    for st in matcher.node(pattern.outputs[0], anchor, State()):
        yield from rest(1, st)
