"""Sparse attention on Inductor: FlexAttention with one ``BlockMask`` per shape.

    attention(q, k, v, None, c, causal=True, window=w, sinks=n | block=B, ...)
        ==>  flex_attention(q, k, v, block_mask=M, scale=c)      several queries (prefill)
        ==>  sdpa(q, cat(k[:n], k[-w:]), ...)                    one query (decode): reads only
                                                                 the sinks and the window

The ``BlockMask`` M is built by one node per distinct (description, query length, key length),
placed before the first layer that uses it and shared by every layer: built once per call of
the graph, never per layer. Inductor compiles ``flex_attention`` to its CPU / GPU template, so
prefill work grows with length × window instead of length². Graphs with symbolic lengths
(Dynamo's dynamic recompile) keep the reference: SDPA with the description's keep-mask, which
is right but computes every pair (Inductor's FlexAttention lowering fails on symbolic lengths
in torch 2.13: ``LoweringException: 'Zero' object has no attribute 'get_name'``).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from ..core.pattern import arguments
from ..ops import attention_keep

__all__ = ["block_mask", "lower_sparse_attention", "sparse_attention"]

_ATTENTION = torch.ops.llmcompile.attention.default
#: argument positions in the op's schema
_SCALE, _CAUSAL, _SPEC = 4, 5, slice(6, 11)


def _mask_mod(s: int, t: int, window: int, sinks: int, block: int, local: int, stride: int):
    offset = t - s  # queries are the last s positions (bottom-right aligned)

    def keep(b, h, q_idx, kv_idx):
        q = q_idx + offset
        ok = kv_idx <= q
        if window:
            ok = ok & ((q - kv_idx < window) | (kv_idx < sinks))
        if block:
            near = q // block - kv_idx // block < local
            ok = ok & (near | ((kv_idx // block + 1) % stride == 0) if stride else near)
        return ok
    return keep


def block_mask(q: torch.Tensor, k: torch.Tensor, window: int, sinks: int, block: int,
               local: int, stride: int):
    """The ``BlockMask`` of a description for ``q [.., S, E]`` over ``k [.., T, E]``."""
    s, t = q.shape[-2], k.shape[-2]
    return create_block_mask(_mask_mod(s, t, window, sinks, block, local, stride), None, None,
                             s, t, device=q.device)


def sparse_attention(q, k, v, scale: float, window: int, sinks: int, block: int, local: int,
                     stride: int, mask=None):
    """What the rewritten node computes; ``mask`` is the shared ``BlockMask`` (prefill)."""
    gqa = bool(q.shape[1] != k.shape[1])
    if mask is None:  # one query: the window and the sinks are all it reads
        if window and isinstance(k.shape[-2], int) and k.shape[-2] > window + sinks:
            k = torch.cat([k[..., :sinks, :], k[..., -window:, :]], dim=-2)
            v = torch.cat([v[..., :sinks, :], v[..., -window:, :]], dim=-2)
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        keep = attention_keep(q.shape[-2], k.shape[-2], q.device, True, window, sinks, block,
                              local, stride)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=scale,
                                              enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)


def _sparse(node: fx.Node) -> tuple | None:
    """(q, k, v, scale, *description) of a causal sparse attention node, else None."""
    if node.target is not _ATTENTION:
        return None
    args = arguments(node)
    spec = tuple(int(a) for a in args[_SPEC])
    if args[3] is not None or not args[_CAUSAL] or not (spec[0] or spec[2]):
        return None
    return (*args[:3], float(args[_SCALE]), *spec)


def lower_sparse_attention(graph: fx.Graph) -> int:
    """Rewrite sparse ``llmcompile.attention`` nodes in place; returns how many."""
    masks: dict[tuple, fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        found = _sparse(node)
        if found is None:
            continue
        q, k, v, scale, *spec = found
        s, t = q.meta["val"].shape[-2], k.meta["val"].shape[-2]
        if not (isinstance(s, int) and isinstance(t, int)):
            continue  # Inductor's FlexAttention fails on symbolic lengths: dense masked SDPA
        mask = None
        if not (isinstance(s, int) and s == 1):
            key = (str(s), str(t), *spec)
            if key not in masks:
                with graph.inserting_before(node):
                    masks[key] = graph.call_function(block_mask, (q, k, *spec))
            mask = masks[key]
        with graph.inserting_before(node):
            new = graph.call_function(sparse_attention, (q, k, v, scale, *spec, mask))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count
