"""Canonical form shared by model graphs and rule patterns.

Two spellings of the same math must become the same graph, or a rule misses its match:

* identity ``aten.to`` / ``aten.alias`` nodes (``x.float()`` on a float tensor) are removed —
  the pre-dispatch graph is not functionalized and later uses of a value can hang off them;
* dimension arguments are written negative (``softmax(x, 3)`` on a 4-d tensor becomes
  ``softmax(x, -1)``), so a pattern traced at one rank matches a model of another;
* ``transpose`` dims are sorted (``x.transpose(-1, -2)`` is ``x.transpose(-2, -1)``);
* ``dropout`` in inference (``train=False``) is the identity and is removed;
* empty 1-d inputs of ``cat`` (``torch.cat([torch.tensor([]), x])``, how a fresh KV cache
  starts) are dropped, as ``cat`` itself ignores them; a ``cat`` of one tensor is that tensor.
"""

from __future__ import annotations

import torch
import torch.fx as fx

aten = torch.ops.aten

__all__ = ["VIEW_OPS", "canonicalize"]

#: ops whose output aliases their first input
VIEW_OPS = {
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.expand,
    aten.unsqueeze, aten.squeeze, aten.slice, aten.select, aten.t, aten.alias, aten.as_strided,
    aten.narrow, aten.split, aten.split_with_sizes, aten.chunk, aten.unflatten, aten.flatten,
    aten.to, aten.detach, aten.view_as, aten.expand_as, aten.unbind,
}

# overload packet -> (argument indices holding a dim, rank offset of the output vs the input)
_DIM_ARGS: dict = {
    aten.transpose: ((1, 2), 0),
    aten.softmax: ((1,), 0),
    aten._softmax: ((1,), 0),
    aten.log_softmax: ((1,), 0),
    aten.mean: ((1,), 0),
    aten.sum: ((1,), 0),
    aten.amax: ((1,), 0),
    aten.amin: ((1,), 0),
    aten.cat: ((1,), 0),
    aten.split: ((2,), 0),
    aten.split_with_sizes: ((2,), 0),
    aten.chunk: ((2,), 0),
    aten.unsqueeze: ((1,), 1),
    aten.squeeze: ((1,), 0),
    aten.select: ((1,), 0),
    aten.slice: ((1,), 0),
    aten.narrow: ((1,), 0),
    aten.unflatten: ((1,), 0),
    aten.cumsum: ((1,), 0),
    aten.argmax: ((1,), 0),
}
_IDENTITY = {aten.to, aten.alias, aten.type_as}


def _rank(value) -> int | None:
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        return val.dim() if isinstance(val, torch.Tensor) else None
    if isinstance(value, (list, tuple)) and value:
        return _rank(value[0])
    return None


def _negative(dim, rank: int):
    if isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0:
        return dim - rank
    if isinstance(dim, (list, tuple)):
        return type(dim)(_negative(d, rank) for d in dim)
    return dim


def _normalize_dims(node: fx.Node) -> None:
    spec = _DIM_ARGS.get(getattr(node.target, "overloadpacket", None))
    if spec is None or not node.args:
        return
    indices, offset = spec
    rank = _rank(node.args[0])
    if rank is None:
        return
    args = list(node.args)
    for i in indices:
        if i < len(args):
            args[i] = _negative(args[i], rank + offset)
    node.args = tuple(args)


def _is_identity(node: fx.Node) -> bool:
    if getattr(node.target, "overloadpacket", None) not in _IDENTITY or not node.args:
        return False
    if node.kwargs.get("copy", False) or node.kwargs.get("memory_format") not in (
        None, torch.preserve_format
    ):
        return False
    src, out = node.args[0], node.meta.get("val")
    src_val = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(src_val, torch.Tensor) or not isinstance(out, torch.Tensor):
        return False
    return src_val.dtype == out.dtype and src_val.device == out.device


def _is_inference_dropout(node: fx.Node) -> bool:
    if node.target is not aten.dropout.default:
        return False
    args = [*node.args, node.kwargs.get("p"), node.kwargs.get("train")][:3]
    return args[2] is False or args[1] == 0.0


def _sort_transpose(node: fx.Node) -> None:
    if getattr(node.target, "overloadpacket", None) is aten.transpose and len(node.args) == 3:
        a, b = node.args[1], node.args[2]
        if isinstance(a, int) and isinstance(b, int) and a > b:
            node.args = (node.args[0], b, a)


def _is_empty_1d(value) -> bool:
    val = value.meta.get("val") if isinstance(value, fx.Node) else None
    return (isinstance(val, torch.Tensor) and val.dim() == 1
            and isinstance(val.shape[0], int) and val.shape[0] == 0)


def _drop_empty_cat_inputs(node: fx.Node) -> bool:
    """Drop legacy empty inputs of ``cat``; True when the node became its only input."""
    if node.target is not aten.cat.default or not isinstance(node.args[0], (list, tuple)):
        return False
    tensors = node.args[0]
    kept = [t for t in tensors if not _is_empty_1d(t)]
    if len(kept) == len(tensors) or not kept:
        return False
    if len(kept) == 1:
        out, src = node.meta.get("val"), kept[0].meta.get("val")
        return isinstance(src, torch.Tensor) and src.dtype == getattr(out, "dtype", None)
    node.args = (kept, *node.args[1:])
    return False


def canonicalize(graph: fx.Graph) -> int:
    """Rewrite ``graph`` in place into canonical form; returns how many nodes were removed."""
    removed = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if _is_identity(node) or _is_inference_dropout(node):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
            removed += 1
            continue
        if _drop_empty_cat_inputs(node):
            node.replace_all_uses_with(next(t for t in node.args[0] if not _is_empty_1d(t)))
            graph.erase_node(node)
            removed += 1
            continue
        if node.target is aten._assert_tensor_metadata.default and not node.users:
            graph.erase_node(node)  # export's dtype checks: static facts, already in meta
            removed += 1
            continue
        _normalize_dims(node)
        _sort_transpose(node)
    for node in reversed(list(graph.nodes)):  # detach_ of a value nobody reads: a no-op
        if node.target in (aten.detach_.default, aten.detach.default) and not node.users:
            graph.erase_node(node)
            removed += 1
    return removed
