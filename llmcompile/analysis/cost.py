"""What a graph costs, as formulas of its sizes: FLOPs and bytes per node (sympy).

Every node of a captured or rewritten graph gets a :class:`Cost`: FLOPs, and bytes read and
written split into *weights* (model parameters and packed constants, each read where it is
used), *kv* (the KV cache: attention's keys and values, and the cache's own updates) and
*activations* (everything else). Sizes stay symbolic: a Dynamo or ``torch.export`` symbol
becomes a sympy symbol, so the totals are closed forms such as ``2·N·s + 4·L·H·E·(p + 1)``.

Rules per op class (``q [B, Hq, S, E]``, ``k/v [B, Hkv, T, E]``, weights ``[N, K]``)::

    linear / mm / bmm / matmul   2·M·N·K flops; weights, inputs and output bytes
    int8 / int4 / nbits linear   2·M·N·K flops; the packed tensors' real bytes (scales included)
    attention                    2·B·Hq·pairs·(E + Ev) flops, pairs = query/key pairs the mask
                                 keeps (dense, causal, window + sinks, block-sparse); keys read
                                 = those any query sees
    embedding                    one row per token (not the table; gather_nbits: its bits)
    rms_norm, rotary, silu_mul,  bytes only (FLOPs are the matmuls' and attention's: the
    pointwise, reductions,       rest is bound by memory); pointwise ops fuse into their
    copies                       neighbours' kernels, so they launch none of their own
    views, sizes, getitem        nothing

An op without a rule is *unknown*: listed by name in :attr:`GraphCost.unknown` (the total is
then marked partial), never counted as free.
"""

from __future__ import annotations

import operator
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import sympy
import torch
import torch.fx as fx

__all__ = ["B", "P", "S", "Cost", "GraphCost", "NodeCost", "attention_pairs", "graph_cost",
           "layer_index", "window_break_even"]

#: tokens in the step, past (cached) length, batch: the names formulas are written in
S, P, B = sympy.symbols("s p b", integer=True, nonnegative=True)

aten = torch.ops.aten
llmc = torch.ops.llmcompile


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes of one node or a sum of nodes (sympy expressions or ints)."""

    flops: Any = 0
    weights: Any = 0  # bytes of weights read
    kv: Any = 0  # bytes of KV cache read or written
    activations: Any = 0  # other bytes read or written

    @property
    def bytes(self):
        return self.weights + self.kv + self.activations

    def __add__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Cost) -> Cost:
        return Cost(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def subs(self, values: Mapping) -> Cost:
        return Cost(*(_subs(getattr(self, f.name), values) for f in fields(self)))

    def simplify(self) -> Cost:
        return Cost(*(sympy.expand(getattr(self, f.name)) for f in fields(self)))

    def numbers(self, values: Mapping) -> dict[str, float]:
        """Every term (and ``bytes``) at concrete sizes."""
        c = self.subs(values)
        return {f.name: float(getattr(c, f.name)) for f in fields(c)} | {"bytes": float(c.bytes)}


def _subs(expr, values: Mapping):
    return expr.subs(values) if isinstance(expr, sympy.Basic) else expr


@dataclass
class NodeCost:
    node: str
    op: str
    #: matmul, packed, attention, embedding, norm, pointwise, reduction, copy
    kind: str
    cost: Cost
    layer: int | None = None
    launches: int = 1


@dataclass
class GraphCost:
    """Per-node costs of one graph; sums, per-kind splits and op counts."""

    nodes: list[NodeCost] = field(default_factory=list)
    #: op name -> number of nodes without a cost rule (their cost is not in the totals)
    unknown: Counter = field(default_factory=Counter)

    @property
    def partial(self) -> bool:
        return bool(self.unknown)

    def total(self) -> Cost:
        return _sum(n.cost for n in self.nodes)

    def by_kind(self) -> dict[str, Cost]:
        out: dict[str, Cost] = {}
        for n in self.nodes:
            out[n.kind] = out.get(n.kind, Cost()) + n.cost
        return out

    @property
    def launches(self) -> int:
        return sum(n.launches for n in self.nodes)

    def op_counts(self) -> Counter:
        return Counter(n.op for n in self.nodes) + self.unknown


def _sum(costs: Iterable[Cost]) -> Cost:
    total = Cost()
    for c in costs:
        total = total + c
    return total


# --------------------------------------------------------------------------- sizes

def _expr(size: Any, rename: Mapping) -> Any:
    """An int, or the sympy expression of a SymInt with the graph's symbols renamed."""
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        return expr.xreplace(rename) if rename else expr
    return int(size)


def _shape(value: Any, rename: Mapping) -> list:
    return [_expr(d, rename) for d in value.shape]


def _numel(shape: Iterable) -> Any:
    n = 1
    for d in shape:
        n = n * d
    return n


def _tensor(node: Any) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val if isinstance(val, torch.Tensor) else None


def _tensors_out(node: fx.Node) -> list[torch.Tensor]:
    val = node.meta.get("val")
    items = val if isinstance(val, (list, tuple)) else [val]
    return [v for v in items if isinstance(v, torch.Tensor)]


# --------------------------------------------------------------------------- op classes

_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default,
          aten.transpose.int, aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim,
          aten.squeeze.dims, aten.squeeze.default, aten.expand.default, aten.slice.Tensor,
          aten.select.int, aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int,
          aten.t.default, aten.alias.default, aten.detach.default, aten.detach_.default,
          aten.contiguous.default, aten.narrow.default, aten.unflatten.int, aten.flatten.using_ints,
          aten.view_as.default, aten.expand_as.default, aten.sym_size.int,
          aten.lift_fresh_copy.default, aten.chunk.default}
_CACHE_UPDATES = {aten.cat.default, aten.index_copy.default, aten.index_copy_.default,
                  aten.index_put.default, aten.index_put_.default, aten.slice_scatter.default,
                  aten.copy_.default, aten.copy.default, aten.select_scatter.default}
_FACTORIES = {aten.arange.default, aten.arange.start, aten.arange.start_step, aten.zeros.default,
              aten.ones.default, aten.full.default, aten.empty.memory_format,
              aten.scalar_tensor.default, aten.zeros_like.default, aten.ones_like.default,
              aten.full_like.default, aten.empty_like.default, aten.new_zeros.default,
              aten.new_ones.default, aten.new_full.default, aten.new_empty.default}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "argmax", "argmin", "softmax",
               "_softmax", "log_softmax", "_log_softmax", "var", "var_mean", "std", "prod",
               "cumsum", "logsumexp", "topk", "any", "all", "norm", "linalg_vector_norm"}
_COPIES = {"cat", "stack", "clone", "copy", "copy_", "index_copy", "index_copy_", "index_put",
           "index_put_", "slice_scatter", "select_scatter", "scatter", "gather", "index",
           "pad", "constant_pad_nd", "repeat", "flip", "roll", "tril", "triu", "_to_copy", "to",
           "repeat_interleave", "masked_fill", "where", "type_as", "sort", "diff"}
_POINTWISE = {"__and__", "__or__", "__xor__", "__invert__", "bitwise_and", "bitwise_or",
              "bitwise_xor", "bitwise_not", "logical_and", "logical_or", "logical_not"}
_MATMULS = {aten.linear.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
            aten.addmm.default, aten.baddbmm.default}
_PACKED = {llmc.int8_linear.default, llmc.int4_linear.default, llmc.matmul_nbits.default}
_NORMS = {llmc.rms_norm.default, llmc.add_rms_norm.default, llmc.rotary.default,
          llmc.silu_mul.default, llmc.gelu_mul.default, aten.layer_norm.default,
          aten.rms_norm.default, aten.native_layer_norm.default}
_ATTENTION = {llmc.attention.default, llmc.group_query_attention.default,
              aten.scaled_dot_product_attention.default}
_META = (operator.getitem,)


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target.namespace, target._schema.name.split("::")[-1]
        return f"{ns}.{name}" if ns != "aten" else name
    return getattr(target, "__name__", str(target))


def _is_symbolic(node: fx.Node) -> bool:
    """Size arithmetic (``operator.add`` on SymInts, ``sym_sum``...): no tensor work."""
    return not isinstance(node.meta.get("val"), (torch.Tensor, list, tuple)) or (
        node.target in _META)


# --------------------------------------------------------------------------- attention

def _sum_min(m, w):
    """Σ_{x=1..m} min(x, w): keys seen by queries 1..m under a window of w (m ≥ 0)."""
    return sympy.Piecewise((m * (m + 1) / 2, m <= w), (w * (w + 1) / 2 + (m - w) * w, True))


def _sum_sinks(m, w, n):
    """Σ_{x=1..m} min(n, max(0, x - w)): sink keys seen outside the window."""
    return sympy.Piecewise((0, m <= w), ((m - w) * (m - w + 1) / 2, m <= w + n),
                           (n * (n + 1) / 2 + (m - w - n) * n, True))


def attention_pairs(s, t, causal: bool = True, window: int = 0, sinks: int = 0,
                    block: int = 0, local_blocks: int = 0, vertical_stride: int = 0):
    """Query/key pairs a mask keeps, for ``s`` queries over ``t`` keys aligned bottom-right
    (the last query is the last key): dense ``s·t``; causal ``s·a + s(s+1)/2`` with
    ``a = t - s`` past keys; a window of ``w`` keys plus ``n`` sinks caps each query's keys at
    ``w + n``. Block-sparse: each query block sees ``local_blocks`` blocks back plus every
    ``vertical_stride``-th block before them (counted per block, causal)."""
    s, t = sympy.sympify(s), sympy.sympify(t)  # exact rationals, never floats
    window, sinks = sympy.Integer(window), sympy.Integer(sinks)
    if block:
        return _block_sparse_pairs(s, t, block, local_blocks, vertical_stride)
    if not causal and not window:
        return s * t
    a = t - s
    if not window:
        return sympy.expand(s * a + s * (s + 1) / 2)
    pairs = _sum_min(a + s, window) - _sum_min(a, window)
    if sinks:
        pairs += _sum_sinks(a + s, window, sinks) - _sum_sinks(a, window, sinks)
    return pairs


def _block_sparse_pairs(s, t, block: int, local: int, stride: int):
    """Approximate (block granularity): every query keeps ``local`` blocks plus one in
    ``stride`` of the blocks before them, each ``block`` keys wide, capped at the causal
    count."""
    keys_per_query = block * (local + sympy.Max(0, (t / block - local)) / max(stride, 1))
    return sympy.Min(s * keys_per_query, attention_pairs(s, t, causal=True))


def window_break_even(window: int, sinks: int = 0, block: int = 128) -> int:
    """The prefill length from which windowed attention does less work than dense causal
    attention, when a kernel works in ``block`` x ``block`` tiles (FlexAttention): each query
    tile visits the tiles its window spans plus the sinks' tile, ``K`` in all, against
    ``s(s + 1)/2`` pairs for a causal kernel that skips the upper triangle. Solved with
    sympy: ``s·K·block = s(s + 1)/2``."""
    tiles = -(-(window - 1) // block) + 1 + (1 if sinks else 0)
    length = sympy.Symbol("length", positive=True)
    roots = sympy.solve(sympy.Eq(length * tiles * block, length * (length + 1) / 2), length)
    return int(sympy.ceiling(max(roots)))


def _keys_read(s, t, node_args: dict) -> Any:
    """Keys any query of the step reads (all of them unless a window bounds it)."""
    window, sinks = node_args.get("window", 0), node_args.get("sinks", 0)
    if window:
        return sympy.Min(t, s - 1 + window + sinks)
    return t


# --------------------------------------------------------------------------- the walker

@dataclass
class _Walk:
    graph: fx.Graph
    is_weight: Callable[[fx.Node], bool]
    rename: Mapping
    kv: set = field(default_factory=set)
    weights: set = field(default_factory=set)

    def bytes_of(self, node: Any) -> Any:
        """Bytes a read of ``node`` touches: its numel, not an expand's broadcast copies."""
        val = _tensor(node)
        if val is None:
            return 0
        n = _numel(_shape(val, self.rename))
        source = node
        while isinstance(source, fx.Node) and source.target in _VIEWS:
            if source.target is aten.expand.default:
                base = _tensor(source.args[0])
                n = sympy.sympify(n) * _numel(_shape(base, self.rename)) / _numel(
                    _shape(_tensor(source), self.rename))
            source = source.args[0]
        return n * val.element_size()

    def read(self, node: Any) -> Cost:
        if not isinstance(node, fx.Node) or _tensor(node) is None:
            return Cost()
        nbytes = self.bytes_of(node)
        if node in self.weights:
            return Cost(weights=nbytes)
        if node in self.kv:
            return Cost(kv=nbytes)
        return Cost(activations=nbytes)

    def write(self, node: fx.Node) -> Cost:
        nbytes = sum(_numel(_shape(v, self.rename)) * v.element_size()
                     for v in _tensors_out(node))
        return Cost(kv=nbytes) if node in self.kv else Cost(activations=nbytes)

    def io(self, node: fx.Node) -> Cost:
        return _sum(self.read(n) for n in dict.fromkeys(node.all_input_nodes)) + self.write(node)


def _mark(walk: _Walk) -> None:
    """Which nodes are weights (weights and their views) and KV cache (attention's k/v
    traced back through views and cache updates to the cache inputs)."""
    for node in walk.graph.nodes:
        if walk.is_weight(node) or (node.target in _VIEWS and node.args
                                    and node.args[0] in walk.weights):
            walk.weights.add(node)
    todo = []
    for node in walk.graph.nodes:
        if node.target in _ATTENTION:
            todo += [a for a in node.args[1:5] if isinstance(a, fx.Node)]
    while todo:
        node = todo.pop()
        if node in walk.kv or node in walk.weights:
            continue
        if node.op == "placeholder" or node.target in _VIEWS or node.target in _CACHE_UPDATES:
            walk.kv.add(node)
            if node.target in _VIEWS:
                todo.append(node.args[0])
            elif node.target is aten.cat.default:
                todo += list(node.args[0])
            elif node.target in _CACHE_UPDATES:
                todo.append(node.args[0])


def _matmul(walk: _Walk, node: fx.Node, kind: str) -> NodeCost:
    """``2·M·N·K`` flops: ``K`` is the activations' last dim (``addmm``'s second argument;
    the first otherwise, packed linears included)."""
    out = _shape(_tensors_out(node)[0], walk.rename)
    a = _tensor(node.args[1] if node.target in (aten.addmm.default, aten.baddbmm.default)
                else node.args[0])
    k = _expr(a.shape[-1], walk.rename)
    return NodeCost(node.name, _op_name(node), kind,
                    Cost(flops=2 * _numel(out) * k) + walk.io(node))


_ALIASES = {"query": "q", "key": "k", "value": "v", "attn_mask": "mask", "is_causal": "causal"}


def _attention(walk: _Walk, node: fx.Node) -> NodeCost:
    """Pairs from the op's mask *description* (causal, window, sinks); a mask tensor is
    applied to every pair, so it costs the dense count."""
    names = [a.name for a in node.target._schema.arguments]
    args = {_ALIASES.get(k, k): v for k, v in {**dict(zip(names, node.args)),
                                               **node.kwargs}.items()}
    (bq, hq, s, e), k, v = (_shape(_tensor(args[n]), walk.rename) for n in "qkv")
    t = k[2]
    spec = {"causal": bool(args.get("causal", False))} | {
        name: int(args.get(name, 0) or 0)
        for name in ("window", "sinks", "block", "local_blocks", "vertical_stride")}
    kv_args = [args["k"], args["v"]]
    if node.target is llmc.group_query_attention.default:
        spec["causal"] = True
        past = _tensor(args["past_k"])
        t = t + (_expr(past.shape[2], walk.rename) if past is not None else 0)
        kv_args += [a for a in (args["past_k"], args["past_v"]) if isinstance(a, fx.Node)]
    pairs = attention_pairs(s, t, **spec)
    keys = _keys_read(s, t, spec)
    kv_read = bq * k[1] * keys * (k[3] + v[3]) * _tensor(args["q"]).element_size()
    others = [a for a in dict.fromkeys(node.all_input_nodes) if a not in kv_args]
    cost = (Cost(flops=2 * bq * hq * pairs * (e + v[3]), kv=kv_read)
            + _sum(walk.read(a) for a in others) + walk.write(node))
    return NodeCost(node.name, _op_name(node), "attention", cost)


def _embedding(walk: _Walk, node: fx.Node) -> NodeCost:
    out = _tensors_out(node)[0]
    rows = _numel(_shape(out, walk.rename)) * out.element_size()  # one row per token
    if node.target is llmc.gather_nbits.default:  # quantized rows (block scales left out)
        rows = _numel(_shape(out, walk.rename)) * node.args[5] / 8
    cost = Cost(weights=rows) + walk.read(node.args[1]) + walk.write(node)
    return NodeCost(node.name, _op_name(node), "embedding", cost)


def _kind(node: fx.Node) -> str | None:
    target = node.target
    if target in _MATMULS:
        return "matmul"
    if target in _PACKED:
        return "packed"
    if target in _ATTENTION:
        return "attention"
    if target in (aten.embedding.default, llmc.gather_nbits.default):
        return "embedding"
    if target in _NORMS:
        return "norm"
    if target in _FACTORIES:
        return "factory"
    if not isinstance(target, torch._ops.OpOverload):
        return None
    name = target._schema.name.split("::")[-1]
    if name in _REDUCTIONS:
        return "reduction"
    if name in _COPIES or target in _CACHE_UPDATES:
        return "copy"
    if torch.Tag.pointwise in target.tags or name in _POINTWISE:
        return "pointwise"
    return None


def _is_free(node: fx.Node) -> bool:
    """Nodes that do no tensor work: inputs, views, size arithmetic, ``getitem``."""
    return node.op != "call_function" or node.target in _VIEWS or _is_symbolic(node)


def _node_cost(walk: _Walk, node: fx.Node, kind: str) -> NodeCost:
    """The cost of one node of a known ``kind`` (:func:`_kind`)."""
    if kind in ("matmul", "packed"):
        return _matmul(walk, node, kind)
    if kind == "attention":
        return _attention(walk, node)
    if kind == "embedding":
        return _embedding(walk, node)
    if kind == "factory":
        return NodeCost(node.name, _op_name(node), "pointwise", walk.write(node), launches=0)
    return NodeCost(node.name, _op_name(node), kind, walk.io(node),
                    launches=int(kind != "pointwise"))


_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


def layer_index(path: str) -> int | None:
    """``model.layers.3.mlp`` -> 3 (the decoder layer a module path belongs to)."""
    found = _LAYER.search(path)
    return int(found.group(1)) if found else None


def graph_cost(graph: fx.Graph, is_weight: Callable[[fx.Node], bool],
               rename: Mapping | None = None,
               module_path: Callable[[fx.Node], str] | None = None) -> GraphCost:
    """The cost of every node of ``graph``.

    ``is_weight`` says which inputs are weights (``Program.is_weight``); ``rename`` maps the
    graph's size symbols to :data:`S`, :data:`P`, :data:`B` (or any expressions);
    ``module_path`` (``Program.module_path``) gives each node its decoder layer.
    """
    walk = _Walk(graph, is_weight, dict(rename or {}))
    _mark(walk)
    out = GraphCost()
    for node in graph.nodes:
        if _is_free(node):
            continue
        kind = _kind(node)
        if kind is None:
            out.unknown[_op_name(node)] += 1
            continue
        cost = _node_cost(walk, node, kind)
        cost.layer = layer_index(module_path(node)) if module_path else None
        out.nodes.append(cost)
    return out
