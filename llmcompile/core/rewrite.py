"""The rewrite engine: applies a RuleSet to a Program until nothing more fires.

All graph surgery lives here. For each candidate anchor it matches the pattern, validates the
match (no intermediate value escapes, scalars used by the replacement are constants, the check
accepts), traces the replacement on the bound values' fake tensors, splices it in, and verifies
that every replaced value keeps its shape and dtype. Every decline is recorded with its reason.
"""

from __future__ import annotations

import inspect
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from .canonicalize import canonicalize
from .matcher import Failure, match_at
from .program import Program
from .rules import Match, Reject, Rule, RuleSet

log = logging.getLogger("llmcompile")

__all__ = ["RuleStats", "Stats", "apply_rules"]

MAX_SWEEPS = 64
MAX_NEAR_MISSES = 64


@dataclass
class RuleStats:
    fired: int = 0
    near_misses: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)

    def miss(self, node: fx.Node, reason: str) -> None:
        if len(self.near_misses) < MAX_NEAR_MISSES:
            self.near_misses.append((node.name, reason))


@dataclass
class Stats:
    """Per rule: how often it fired, and the near misses with reasons."""

    rules: dict[str, RuleStats] = field(default_factory=lambda: defaultdict(RuleStats))
    #: what a pass wants users to know beyond its rules (a break-even length, bytes saved)
    notes: list[str] = field(default_factory=list)

    def fired(self, name: str) -> int:
        return self.rules[name].fired if name in self.rules else 0

    def reasons(self, name: str) -> list[str]:
        return [r for _, r in self.rules[name].near_misses] if name in self.rules else []

    @property
    def total(self) -> int:
        return sum(s.fired for s in self.rules.values())


def _validate(rule: Rule, match: Match) -> str | dict[str, Any]:
    """A reason to decline, or the extra replacement kwargs from the check."""
    matched = set(match.nodes)
    outputs = set(match.outputs)
    for node in match.nodes:
        if node in outputs:
            continue
        escaping = [u for u in node.users if u not in matched]
        if escaping:
            return (f"intermediate %{node.name} ({node.target}) is also used outside the "
                    f"pattern by %{escaping[0].name}")
    for name, value in match.binds.items():
        if isinstance(value, fx.Node) and value in matched:
            return f"wildcard {name!r} is bound to a node inside the match"
    verdict = rule.check(match) if rule.check is not None else None
    if isinstance(verdict, Reject):
        return verdict.reason
    if verdict is not None and not isinstance(verdict, dict):
        raise TypeError(f"check of rule {rule.name!r} must return Reject, None or a dict, "
                        f"got {type(verdict).__name__}")
    return dict(verdict or {})


def _replacement_args(rule: Rule, match: Match, extra: dict[str, Any]):
    """Split the replacement's parameters into graph inputs (tensors) and constants."""
    tensors: list[tuple[str, fx.Node]] = []
    constants: dict[str, Any] = {}
    for name, param in inspect.signature(rule.replacement).parameters.items():
        if name not in extra and name not in match.binds and param.default is not param.empty:
            continue  # optional parameter the match does not provide: keep its default
        if name in extra and isinstance(extra[name], (torch.Tensor, fx.Node)):
            tensors.append((name, extra[name]))  # a compile-time tensor (becomes a constant)
            # or another graph value the check chose (e.g. the input behind a view chain)
        elif name in extra:
            constants[name] = extra[name]
        elif name not in match.binds:
            raise TypeError(f"replacement of rule {rule.name!r} has parameter {name!r} that the "
                            "pattern does not bind and the check does not provide")
        elif isinstance(match.binds[name], fx.Node) and name in rule.pattern.tensor_params():
            tensors.append((name, match.binds[name]))
        elif isinstance(match.binds[name], fx.Node):
            return None, f"scalar {name!r} is not a compile-time constant"
        else:
            constants[name] = match.binds[name]
    return (tensors, constants), None


def _trace_replacement(program: Program, rule: Rule, tensors, constants) -> fx.GraphModule:
    """The replacement traced on the match's values; reused for every match with the same
    rule, constants and input shapes, dtypes and strides (the symbols of one shape
    environment), which is every layer of a model."""
    names = [n for n, _ in tensors]
    vals = [node.meta["val"] for _, node in tensors]
    key = _trace_key(rule, names, vals, constants)
    if key is not None and key in program.replacements:
        return program.replacements[key]

    def call(*ts):
        return rule.replacement(**dict(zip(names, ts)), **constants)

    gm = _compat.trace_aten(call, vals, program.fake_mode)
    canonicalize(gm.graph)
    if key is not None:
        program.replacements[key] = gm
    return gm


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _trace_key(rule: Rule, names: list[str], vals: list[Any], constants: dict[str, Any]
               ) -> tuple | None:
    """What a traced replacement depends on; None when a constant is not a plain value."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            parts = [plain(x) for x in v]
            return None if any(p is None for p in parts) else (type(v).__name__, *parts)
        return (type(v).__name__, repr(v)) if isinstance(v, _PLAIN) else None

    def value(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return (v.dtype, v.device, tuple(map(str, v.shape)), tuple(map(str, v.stride())))
        return plain(v) if not isinstance(v, torch.SymInt) else ("sym", str(v))

    consts = tuple((k, plain(v)) for k, v in sorted(constants.items()))
    if any(c is None for _, c in consts):
        return None
    shapes = tuple(value(v) for v in vals)
    if any(s is None for s in shapes):
        return None
    # which inputs are one value: the trace follows a value, so a replacement traced with
    # two parameters bound to one tensor reads that tensor for both (layer 0's past K/V is
    # also the input every layer reads the past length from)
    same = tuple(next(j for j, w in enumerate(vals) if w is v) for v in vals)
    return (rule, tuple(names), shapes, same, consts)


def _splice(program: Program, rep: fx.GraphModule, inputs: list[fx.Node], where: fx.Node,
            match: Match) -> list[fx.Node]:
    """Copy the replacement graph into the program before ``where``; return its outputs."""
    graph, rule = program.graph, match.rule
    env: dict[fx.Node, Any] = {}
    placeholders = iter(inputs)
    meta_keep = {k: match.anchor.meta[k] for k in ("nn_module_stack", "stack_trace")
                 if k in match.anchor.meta}
    outputs: list[Any] = []
    with graph.inserting_before(where):
        for node in rep.graph.nodes:
            if node.op == "placeholder":
                env[node] = next(placeholders)
            elif node.op == "get_attr":
                env[node] = program.add_constant(getattr(rep, node.target), hint=rule.name)
            elif node.op == "output":
                out = node.args[0]
                outputs = list(out) if isinstance(out, (list, tuple)) else [out]
                outputs = [env[o] if isinstance(o, fx.Node) else o for o in outputs]
            else:
                new = graph.node_copy(node, lambda n: env[n])
                new.meta.update(meta_keep)
                new.meta["llmc_rule"] = rule.name
                env[node] = new
    return outputs


def _same_value(old: fx.Node, new: Any) -> str | None:
    ov, nv = old.meta.get("val"), new.meta.get("val") if isinstance(new, fx.Node) else new
    if isinstance(ov, torch.Tensor):
        if not isinstance(nv, torch.Tensor):
            return f"replacement of %{old.name} is not a tensor"
        if ov.dtype != nv.dtype or not _compat.same_shape(ov.shape, nv.shape):
            return (f"replacement of %{old.name} has {nv.dtype}{list(nv.shape)}, expected "
                    f"{ov.dtype}{list(ov.shape)}")
    return None


def _rewrite(program: Program, rule: Rule, match: Match, extra: dict[str, Any]) -> str | None:
    """Splice the replacement in for one validated match; a reason if it cannot be done."""
    args, reason = _replacement_args(rule, match, extra)
    if reason:
        return reason
    tensors, constants = args
    order = list(program.graph.nodes)
    pos = {n: i for i, n in enumerate(order)}
    inputs = [node for _, node in tensors if isinstance(node, fx.Node)]
    # insert at the first matched node, or just after the last input if that comes later;
    # either way before the first user of any replaced output
    uses = [pos[u] for o in match.outputs for u in o.users]
    last_input = max((pos[n] for n in inputs), default=-1)
    if uses and last_input >= min(uses):
        return "an input of the replacement is computed after a use of the matched value"
    where = order[max(min(pos[n] for n in match.nodes), last_input + 1)]
    with program.graph.inserting_before(where):  # tensors the check computed (packed weights)
        tensors = [(name, v if isinstance(v, fx.Node) else program.add_constant(v, rule.name))
                   for name, v in tensors]
    rep = _trace_replacement(program, rule, tensors, constants)
    new_outputs = _splice(program, rep, [node for _, node in tensors], where, match)
    if len(new_outputs) != len(match.outputs):
        raise ValueError(f"rule {rule.name!r}: replacement returns {len(new_outputs)} values, "
                         f"pattern returns {len(match.outputs)}")
    for old, new in zip(match.outputs, new_outputs):
        problem = _same_value(old, new)
        if problem:
            raise ValueError(f"rule {rule.name!r} is wrong: {problem}")
    for old, new in zip(match.outputs, new_outputs):
        old.replace_all_uses_with(new)
    for node in sorted(match.nodes, key=lambda n: -pos[n]):
        if not node.users:
            program.graph.erase_node(node)
    return None


def _try_anchor(program: Program, rule: Rule, anchor: fx.Node, by_target, stats: RuleStats
                ) -> bool:
    failure = Failure()
    reasons = []
    for state in match_at(rule.pattern, anchor, by_target, failure):
        match = Match(rule, state.nodes, state.binds, program)
        verdict = _validate(rule, match)
        if isinstance(verdict, str):
            reasons.append(verdict)
            continue
        reason = _rewrite(program, rule, match, verdict)
        if reason is None:
            return True
        reasons.append(reason)
    if reasons:
        stats.miss(anchor, reasons[0])
    elif failure.depth >= min(2, len(rule.pattern.ops)):
        stats.miss(anchor, failure.reason)
    return False


def _index(graph: fx.Graph) -> dict[Any, list[fx.Node]]:
    by_target: dict[Any, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function":
            by_target[node.target].append(node)
    return by_target


def apply_rules(program: Program, rules: RuleSet, stats: Stats | None = None) -> Stats:
    """Rewrite ``program`` with ``rules`` to a fixed point; returns per-rule statistics."""
    stats = stats if stats is not None else Stats()
    for _sweep in range(MAX_SWEEPS):
        fired = False
        for rule in rules:
            rule_stats = stats.rules[rule.name]
            rule_stats.near_misses.clear()  # only the last sweep's misses are still misses
            by_target = _index(program.graph)
            for anchor in list(by_target.get(rule.pattern.outputs[0].target, [])):
                if getattr(anchor, "_erased", False):
                    continue
                if _try_anchor(program, rule, anchor, by_target, rule_stats):
                    rule_stats.fired += 1
                    fired = True
                    by_target = _index(program.graph)
        if not fired:
            program.recompile()
            return stats
    raise RuntimeError(f"rules {rules.name!r} did not reach a fixed point in {MAX_SWEEPS} sweeps "
                       "(a rule's replacement matches its own pattern?)")
