"""Helpers for unit-testing rules: the same ones the built-in rule sets are tested with.

```python
from .testing import check_rewrite, assert_declines

def before(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w

def expected(x, w):
    return ops.rms_norm(x, w, 1e-6)

check_rewrite(RULES, before, expected, (torch.randn(2, 5, 64), torch.randn(64)), count=1)
```
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx

from .core.canonicalize import canonicalize
from .core.matcher import COMMUTATIVE
from .core.program import Program, capture_function
from .core.rewrite import Stats, apply_rules
from .core.rules import Rule, RuleSet

__all__ = ["assert_declines", "check_rewrite", "graph_signature", "rewrite"]


def _as_ruleset(rules: RuleSet | Rule | Sequence[Rule]) -> RuleSet:
    if isinstance(rules, RuleSet):
        return rules
    if isinstance(rules, Rule):
        return RuleSet(rules.name, [rules])
    return RuleSet("rules", list(rules))


def rewrite(rules, fn: Callable, inputs: Sequence[Any], weights: Sequence[int] = ()
            ) -> tuple[Program, Stats]:
    """Trace ``fn`` on ``inputs``, canonicalize, apply ``rules``; returns (program, stats).

    ``weights`` are the indices of ``inputs`` that stand for model weights (so checks that
    require ``m.is_weight(...)`` accept them, and weight-only subgraphs may fold).
    """
    program = capture_function(fn, inputs, weights)
    canonicalize(program.graph)
    stats = apply_rules(program, _as_ruleset(rules))
    return program, stats


def graph_signature(graph: fx.Graph) -> list[str]:
    """A canonical, name-independent description of a graph, for structural comparison.

    Each output is written as a nested expression of ops, placeholders (by position) and
    constants; commutative arguments are sorted, so ``a * b`` and ``b * a`` compare equal.
    """
    placeholders = {n: f"in{i}" for i, n in enumerate(n for n in graph.nodes
                                                        if n.op == "placeholder")}
    memo: dict[fx.Node, str] = {}

    def expr(v: Any) -> str:
        if isinstance(v, fx.Node):
            if v not in memo:
                memo[v] = node_expr(v)
            return memo[v]
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(expr(x) for x in v) + "]"
        if isinstance(v, float):
            return f"{v:.6g}"
        return repr(v)

    def node_expr(n: fx.Node) -> str:
        if n.op == "placeholder":
            return placeholders[n]
        if n.op == "get_attr":
            return f"const{tuple(getattr(n.graph.owning_module, n.target).shape)}"
        args = [expr(a) for a in n.args]
        if n.target in COMMUTATIVE and len(args) >= 2:
            args[:2] = sorted(args[:2])
        kwargs = [f"{k}={expr(v)}" for k, v in sorted(n.kwargs.items())]
        name = n.target.__name__ if n.target is operator.getitem else str(n.target)
        return f"{name}({', '.join(args + kwargs)})"

    out = next(n for n in graph.nodes if n.op == "output").args[0]
    outs = out if isinstance(out, (list, tuple)) else [out]
    return [expr(o) for o in outs]


def _run(program: Program, inputs: Sequence[Any]):
    out = program.gm(*inputs)
    return out if isinstance(out, (list, tuple)) else (out,)


def check_rewrite(rules, before: Callable, expected: Callable | None, inputs: Sequence[Any], *,
                  count: int | dict[str, int] | None = None, weights: Sequence[int] = (),
                  rtol: float = 1e-5, atol: float = 1e-5) -> Stats:
    """Assert that ``rules`` rewrite ``before`` into ``expected``.

    Checks, in order: the number of rewrites (``count``: a total, or per rule name), that the
    rewritten graph has the same structure as ``expected`` traced the same way (skipped when
    ``expected`` is None), and that the rewritten graph computes what ``before`` computes on
    ``inputs``. Returns the statistics for further assertions.
    """
    program, stats = rewrite(rules, before, inputs, weights)
    if isinstance(count, int):
        assert stats.total == count, (
            f"expected {count} rewrites, got {stats.total}: "
            + ", ".join(f"{k}={v.fired}" for k, v in stats.rules.items())
            + _misses(stats))
    elif isinstance(count, dict):
        got = {name: stats.fired(name) for name in count}
        assert got == count, f"expected rewrites {count}, got {got}{_misses(stats)}"
    if expected is not None:
        want = capture_function(expected, inputs, weights)
        canonicalize(want.graph)
        got_sig, want_sig = graph_signature(program.graph), graph_signature(want.graph)
        assert got_sig == want_sig, (
            "rewritten graph differs from expected:\n  got:      "
            + "\n            ".join(got_sig) + "\n  expected: " + "\n            ".join(want_sig))
    with torch.no_grad():
        ref = before(*inputs)
        ref = ref if isinstance(ref, (list, tuple)) else (ref,)
        out = _run(program, inputs)
    assert len(out) == len(ref), f"{len(out)} outputs, expected {len(ref)}"
    for i, (o, r) in enumerate(zip(out, ref)):
        torch.testing.assert_close(o, r, rtol=rtol, atol=atol,
                                   msg=lambda m, i=i: f"output {i} differs after rewrite: {m}")
    return stats


def _misses(stats: Stats) -> str:
    lines = [f"\n  {name} declined at %{node}: {why}" for name, s in stats.rules.items()
             for node, why in s.near_misses[:3]]
    return "".join(lines)


def assert_declines(rules, fn: Callable, inputs: Sequence[Any], *, rule: str, reason: str,
                    weights: Sequence[int] = ()) -> Stats:
    """Assert that ``rule`` did not fire on ``fn`` and declined with a reason containing
    ``reason`` (a substring, case-insensitive)."""
    _, stats = rewrite(rules, fn, inputs, weights)
    assert stats.fired(rule) == 0, f"rule {rule!r} fired {stats.fired(rule)} times"
    reasons = stats.reasons(rule)
    assert any(reason.lower() in r.lower() for r in reasons), (
        f"rule {rule!r} declined with {reasons or 'no reason (no near miss recorded)'}, "
        f"expected one containing {reason!r}")
    return stats


#: the contrib / fused ONNX ops the onnxruntime target and export emit
ONNX_FUSED_OPS = ("GroupQueryAttention", "SkipSimplifiedLayerNormalization",
                  "SimplifiedLayerNormalization", "RotaryEmbedding", "MatMulNBits",
                  "GatherBlockQuantized")


def onnx_op_counts(path) -> dict[str, int]:
    """How many of each fused op (:data:`ONNX_FUSED_OPS`) an ONNX file holds."""
    import collections

    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in model.graph.node
                                    if n.op_type in ONNX_FUSED_OPS))
