"""Cleanup: fold weight-only subgraphs into compile-time constants, drop dead nodes.

Rules stay declarative by computing on weights in the graph (``cat([wq, wk, wv])``,
``quantize(w)``); folding evaluates such subgraphs once, at compile time, on the real weights,
and the graph then reads the result through a ``get_attr`` constant (freezing semantics: the
compiled graph keeps the weights it was compiled with).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from .program import Program

__all__ = ["eliminate_dead_code", "evaluate", "fold_weights"]

_NEVER_FOLD = {"rand", "randn", "randint", "bernoulli", "dropout", "normal", "empty"}


def _pure(node: fx.Node) -> bool:
    target = node.target
    if target is operator.getitem:
        return True
    schema = getattr(target, "_schema", None)
    if schema is None or schema.is_mutable:
        return False
    return not any(word in schema.name for word in _NEVER_FOLD)


def _foldable(program: Program) -> list[fx.Node]:
    const: set[fx.Node] = {n for n in program.graph.nodes if program.is_weight(n)}
    order = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not _pure(node):
            continue
        inputs = node.all_input_nodes
        if inputs and all(i in const for i in inputs) and not _symbolic(node):
            const.add(node)
            order.append(node)
    return order


def _symbolic(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return any(not isinstance(s, int) for s in val.shape)
    return not isinstance(val, (tuple, list))


def evaluate(program: Program, nodes, env: dict[fx.Node, Any] | None = None
             ) -> dict[fx.Node, Any]:
    """Run ``nodes`` (in graph order) on real values, without autograd: an argument is read from
    ``env`` (values given or computed so far) or, for a weight, from the program. Returns
    ``env`` with every node's value."""
    env = {} if env is None else env

    def value(v):
        if isinstance(v, fx.Node):
            return env[v] if v in env else program.weight(v)
        return v

    with torch.no_grad():
        for node in nodes:
            if node in env:
                continue
            if node.op in ("placeholder", "get_attr"):
                env[node] = program.weight(node)
                continue
            args = fx.node.map_aggregate(node.args, value)
            kwargs = fx.node.map_aggregate(node.kwargs, value)
            env[node] = node.target(*args, **kwargs)
    return env


def fold_weights(program: Program) -> int:
    """Evaluate nodes that depend only on weights; returns how many constants were created."""
    order = _foldable(program)
    if not order:
        return 0
    members = set(order)
    env = evaluate(program, order)
    created = 0
    for node in order:
        if all(u in members for u in node.users) or not isinstance(env[node], torch.Tensor):
            continue
        with program.graph.inserting_before(node):
            const = program.add_constant(env[node].contiguous(), hint="folded")
        const.meta["llmc_source"] = program.sources[const.name] = _common_source(program, node)
        node.replace_all_uses_with(const)
        created += 1
    eliminate_dead_code(program.graph)
    return created


def _common_source(program: Program, node: fx.Node) -> str:
    """The module a folded value's weights share (``model.layers.0.self_attn`` for the
    concatenated Q/K/V weights), or the node's name when they share none."""
    leaves, todo, seen = [], [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if program.is_weight(n):
            leaves.append(program.sources.get(n.name) or n.meta.get("llmc_source") or n.name)
        else:
            todo.extend(n.all_input_nodes)
    if len(leaves) == 1:
        return leaves[0]
    common = []
    for column in zip(*(leaf.split(".") for leaf in leaves)):
        if len(set(column)) != 1:
            break
        common.append(column[0])
    return ".".join(common) or node.name


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Remove unused pure nodes (never in-place or mutating ops, e.g. KV-cache writes)."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.op in ("call_function", "get_attr") and not node.users and (
                node.op == "get_attr" or _pure(node)):
            graph.erase_node(node)
            removed += 1
            if node.op == "get_attr":
                _drop_attr(graph, node.target)
    return removed


def _drop_attr(graph: fx.Graph, target: str) -> None:
    module = graph.owning_module
    still_read = any(n.op == "get_attr" and n.target == target for n in graph.nodes)
    if module is not None and not still_read and target in module._buffers:
        delattr(module, target)
