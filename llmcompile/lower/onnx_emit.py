"""ONNX straight from the rewritten program: each FX node translated once, no second trace.

The rewritten Program already is an ATen graph with a fake value (shape, dtype, symbolic
sizes) on every node, which is all a translation needs. This module hands that graph, node by
node, to the translations torch.onnx itself uses (torchlib, plus :mod:`llmcompile.ops.onnx`
for the fused ops), and writes the weights as initializers. The traced way (``torch.export``
of the graph, then ``torch.onnx.export``, which decomposes and traces it again) gives the same
file but spends most of an export re-deriving what the graph already says: on SmolLM2 it took
16 s of a 35 s export, this takes about 2 s (BENCHMARKS.md).

What the traced way does on the way and this module does itself:

* explicit casts where ATen promotes types implicitly (``int64 * 0.5``, ``float16 + float32``,
  ``sum`` of a bool mask): ONNX ops take operands of one type;
* assertion nodes dropped; ``split`` by a static size written as ``split_with_sizes``;
* one initializer for a tensor registered as two weights (a tied embedding and LM head).

:func:`emit` raises :class:`NotDirect` for a graph it does not translate (an op without an
ONNX translation, which the traced way would decompose first; an in-place write; a
higher-order op); :func:`~llmcompile.lower.onnxruntime.to_onnx` then takes the traced way.
"""

from __future__ import annotations

import operator
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from ..core.program import Program, mutated_inputs, tensor_key

__all__ = ["NotDirect", "emit", "registry"]

_REGISTRIES: dict[tuple, Any] = {}
_ASSERTIONS = {torch.ops.aten._assert_async.default, torch.ops.aten._assert_async.msg,
               torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range_for_size
               .default, torch.ops.aten._assert_tensor_metadata.default}
#: reductions that accumulate in their output type (``sum`` of bool or int32 is int64)
_ACCUMULATING = {torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList,
                 torch.ops.aten.cumsum.default, torch.ops.aten.prod.default,
                 torch.ops.aten.prod.dim_int}
#: ops whose bool inputs are masks / conditions, never operands to promote
_MASKED = {torch.ops.aten.where.self, torch.ops.aten.masked_fill.Scalar,
           torch.ops.aten.masked_fill.Tensor}


class NotDirect(Exception):
    """The graph needs the traced way (says which node and why)."""


def registry(opset: int, table: dict, key: tuple) -> Any:
    """torch.onnx's translations plus ``table`` (cached per ``key``: provider and dtype)."""
    if key not in _REGISTRIES:
        try:
            _REGISTRIES[key] = _compat.onnx_registry(opset, table)
        except (ImportError, AttributeError, TypeError) as e:  # torch.onnx's internals moved
            raise NotDirect(f"torch.onnx's translation registry: {_cause(e)}") from e
    return _REGISTRIES[key]


def _check(program: Program, reg: Any) -> None:
    if mutated_inputs(program.graph):
        raise NotDirect("the graph writes an input in place")
    for node in program.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            held = operator.attrgetter(node.target)(program.gm)
            if not isinstance(held, torch.Tensor):
                raise NotDirect(f"%{node.name} reads {node.target}, a {type(held).__name__}")
            continue
        if node.op != "call_function":
            raise NotDirect(f"%{node.name} is a {node.op} node")
        if "val" not in node.meta:
            raise NotDirect(f"%{node.name} ({node.target}) has no fake value")
        if node.target is operator.getitem or node.target in _ASSERTIONS:
            continue
        if isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable:
            raise NotDirect(f"%{node.name} ({node.target}) writes in place")
        if not _compat.onnx_translatable(reg, node.target):
            raise NotDirect(f"%{node.name}: {node.target} has no ONNX translation (the traced "
                            "way decomposes it first)")


def _constants_to_weights(program: Program) -> None:
    """Constants the passes made (``get_attr`` of a folded or packed tensor) become weight
    placeholders, one per tensor, so that they are written as initializers like weights."""
    graph = program.graph
    made: dict[str, fx.Node] = {}
    # new placeholders go before the first node that stays (get_attr nodes are erased below)
    first = next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        tensor = operator.attrgetter(node.target)(program.gm)
        if node.target not in made:
            with graph.inserting_before(first):
                made[node.target] = graph.placeholder(node.target.replace(".", "_"))
            made[node.target].meta["val"] = node.meta["val"]
            program.weights[made[node.target].name] = tensor
            program.sources[made[node.target].name] = node.target
        node.replace_all_uses_with(made[node.target])
        graph.erase_node(node)


def _dedupe_weights(program: Program) -> None:
    """Weights that are one tensor (same storage, shape, strides) become one placeholder;
    weights nothing reads any more (folded into a packed constant) are dropped."""
    seen: dict[tuple, fx.Node] = {}
    for node in [n for n in program.graph.nodes if n.op == "placeholder"
                 and n.name in program.weights]:
        if not node.users:
            program.graph.erase_node(node)
            del program.weights[node.name]
            continue
        key = tensor_key(program.weights[node.name])
        if key in seen:
            node.replace_all_uses_with(seen[key])
            program.graph.erase_node(node)
            del program.weights[node.name]
        else:
            seen[key] = node


def _cast(graph: fx.Graph, value: fx.Node, dtype: torch.dtype, before: fx.Node) -> fx.Node:
    with graph.inserting_before(before):
        cast = graph.call_function(torch.ops.aten._to_copy.default, (value,), {"dtype": dtype})
    cast.meta["val"] = value.meta["val"].to(dtype)
    return cast


def _tensor_args(node: fx.Node) -> list[tuple[int, fx.Node]]:
    return [(i, a) for i, a in enumerate(node.args) if isinstance(a, fx.Node)
            and isinstance(a.meta.get("val"), torch.Tensor)]


def _promote_types(graph: fx.Graph) -> int:
    """Cast the operands of pointwise ops, ``cat`` and sums to the type ATen computes in,
    where ATen promotes implicitly; returns how many casts were added."""
    added = 0
    for node in list(graph.nodes):
        target = node.target
        pointwise = target in _ACCUMULATING or (
            isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags
            and target is not torch.ops.prims.convert_element_type.default)  # a cast itself
        if node.op != "call_function" or not (pointwise or target is torch.ops.aten.cat.default):
            continue
        out = node.meta.get("val")
        if not isinstance(out, torch.Tensor):
            continue
        if target is torch.ops.aten.cat.default:
            parts = [a if a.meta["val"].dtype == out.dtype else _cast(graph, a, out.dtype, node)
                     for a in node.args[0]]
            added += sum(p is not a for p, a in zip(parts, node.args[0]))
            node.args = (parts, *node.args[1:])
            continue
        operands = [(i, a) for i, a in _tensor_args(node)
                    if not (target in _MASKED and a.meta["val"].dtype == torch.bool)]
        if out.dtype == torch.bool:  # a comparison: operands meet in their common type
            if not operands:
                continue
            vals = [a.meta["val"] for _, a in operands]
            dtype = torch.result_type(*vals[:2]) if len(vals) == 2 else vals[0].dtype
            for scalar in node.args:  # an int tensor against 0.5 compares as float
                if isinstance(scalar, float) and not dtype.is_floating_point:
                    dtype = torch.get_default_dtype()
        else:
            dtype = out.dtype
        args = list(node.args)
        for i, a in operands:
            if a.meta["val"].dtype != dtype:
                args[i] = _cast(graph, a, dtype, node)
                added += 1
        node.args = tuple(args)
    return added


def _split_by_sizes(graph: fx.Graph) -> None:
    """``split(x, n, dim)`` over a static dimension becomes ``split_with_sizes``, whose
    translation gives one value per part (torchlib's ``split`` gives an ONNX sequence, read
    back by a ``getitem`` function per part): what torch.export's decomposition does."""
    for node in [n for n in graph.nodes if n.target is torch.ops.aten.split.Tensor]:
        x, size = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        length = x.meta["val"].shape[dim]
        if not isinstance(size, int) or not isinstance(length, int):
            continue
        sizes = [min(size, length - start) for start in range(0, length, size)]
        node.target, node.args, node.kwargs = (torch.ops.aten.split_with_sizes.default,
                                               (x, sizes, dim), {})


def _drop_assertions(graph: fx.Graph) -> None:
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _ASSERTIONS]:
        graph.erase_node(node)


def emit(program: Program, path: str | os.PathLike, reg: Any, *,
         input_names: Sequence[str] | None = None,
         output_names: Sequence[str] | None = None) -> list[int]:
    """Write ``program`` (lowering rules applied, symbolic sizes as ``sym_size``) to ``path``
    with its weights as external data. Returns the ONNX output index of each graph output.
    Raises :class:`NotDirect` when it needs the traced way; the program is then still a valid
    input for it (weights may have been merged and casts made explicit, nothing else)."""
    _check(program, reg)
    _constants_to_weights(program)
    _dedupe_weights(program)
    graph = program.graph
    _drop_assertions(graph)
    _split_by_sizes(graph)
    _promote_types(graph)
    try:
        model, values = _compat.onnx_translate(graph, reg, "llmcompile", reg.opset_version)
    except Exception as e:  # a translation that does not take this node's arguments
        raise NotDirect(f"translation failed: {_cause(e)}") from e
    try:
        outs = _bind(model, values, program, input_names, output_names)
        _compat.onnx_save(model, str(path))
    except (ImportError, AttributeError, TypeError) as e:  # torch.onnx's internals moved
        raise NotDirect(f"writing the model: {_cause(e)}") from e
    return list(range(outs))


def _bind(model: Any, values: dict, program: Program, input_names: Sequence[str] | None,
          output_names: Sequence[str] | None) -> int:
    """Inputs, weights as initializers (named after their module paths) and outputs of the
    translated model; returns the number of outputs."""
    import onnx_ir as ir

    graph = program.graph
    onnx_graph = model.graph
    onnx_graph.inputs.clear()
    onnx_graph.outputs.clear()
    names: set[str] = set()
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        value = values[node.name]
        if node.name not in program.weights:
            onnx_graph.inputs.append(value)
            continue
        name = _unique(program.sources.get(node.name) or node.name, names)
        value.name = name
        value.const_value = _compat.onnx_tensor(program.weights[node.name].contiguous(), name)
        onnx_graph.initializers[name] = value
    if input_names:
        for value, name in zip(onnx_graph.inputs, input_names):
            value.name = name
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0] if isinstance(output.args[0], (list, tuple)) else (output.args[0],)
    for i, node in enumerate(outs):
        value = values[node.name]
        if value in onnx_graph.outputs or value.is_graph_input() or value.is_initializer():
            # every output its own value, so that each can carry its own name
            identity = ir.node("Identity", [value], num_outputs=1)
            onnx_graph.append(identity)
            value = identity.outputs[0]
            value.dtype, value.shape = identity.inputs[0].dtype, identity.inputs[0].shape
        value.name = output_names[i] if output_names else value.name or f"output_{i}"
        onnx_graph.outputs.append(value)
    return len(outs)


def _unique(name: str, taken: set[str]) -> str:
    base, i = name, 1
    while name in taken:
        name, i = f"{base}.{i}", i + 1
    taken.add(name)
    return name


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
