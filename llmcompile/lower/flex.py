"""Sparse attention on Inductor: FlexAttention with one ``BlockMask`` per shape.

    attention(q, k, v, None, c, causal=True, window=w, sinks=n | block=B, ...)
        ==>  flex_attention(q, k, v, block_mask=M, scale=c)      several queries (prefill)
        ==>  sdpa(q, cat(k[:n], k[-w:]), ...)                    one query (decode): reads only
                                                                 the sinks and the window

The ``BlockMask`` M of each distinct (description, query length, key length) is built once, at
compile time (and cached for the process); its block tables become graph constants, from which
one node per shape rebuilds the ``BlockMask`` object that every layer shares: the mask is never
evaluated per layer or per call. Inductor compiles ``flex_attention`` to its CPU / GPU template, so
prefill work grows with length × window instead of length². A graph of symbolic length (after
Dynamo's one dynamic recompile) builds a window's ``BlockMask`` in the graph from tile
arithmetic (:func:`window_block_mask`: no mask evaluation, which Inductor cannot lower with
symbolic sizes in torch 2.13), so it stays sparse and recompiles no more; symbolic lengths with
past keys or blocks keep the reference (SDPA with the description's keep-mask).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .. import _compat
from ..core.pattern import arguments
from ..ops import attention_keep, keep_pairs

__all__ = ["block_mask", "from_blocks", "lower_sparse_attention", "sparse_attention",
           "window_block_mask"]

_ATTENTION = torch.ops.llmcompile.attention.default
#: argument positions in the op's schema
_SCALE, _CAUSAL, _SPEC = 4, 5, slice(6, 11)


def _mask_mod(s: int, t: int, window: int, sinks: int, block: int, local: int, stride: int):
    offset = t - s  # queries are the last s positions (bottom-right aligned)

    def keep(b, h, q_idx, kv_idx):
        return keep_pairs(q_idx + offset, kv_idx, True, window, sinks, block, local, stride)
    return keep


#: (S, T, description, device) -> BlockMask, built once per shape in this process
_BUILT: dict[tuple, BlockMask] = {}


def block_mask(s: int, t: int, device: torch.device, *spec: int) -> BlockMask:
    """The ``BlockMask`` of a description for ``s`` queries over ``t`` keys, built once."""
    key = (s, t, *spec, str(device))
    if key not in _BUILT:
        with _compat.no_tracing_context():  # real tensors, outside the graph being compiled
            _BUILT[key] = create_block_mask(_mask_mod(s, t, *spec), None, None, s, t,
                                            device=device)
    return _BUILT[key]


def from_blocks(kv_num_blocks, kv_indices, full_num_blocks, full_indices, s: int, t: int,
                q_block: int, kv_block: int, *spec: int) -> BlockMask:
    """A ``BlockMask`` from its precomputed block tables (graph constants): nothing is
    evaluated per call (inference needs no query-block tables)."""
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, full_num_blocks, full_indices,
                                    BLOCK_SIZE=(q_block, kv_block),
                                    mask_mod=_mask_mod(s, t, *spec), seq_lengths=(s, t),
                                    compute_q_blocks=False)


def window_block_mask(q: torch.Tensor, window: int, sinks: int, tile: int = 128) -> BlockMask:
    """A prefill's ``BlockMask`` (queries = keys, any length, symbolic included) from tile
    arithmetic alone: tile ``j`` is visited by query tile ``i`` when some pair in it is causal
    and within the window (the closest pair is ``max(0, (i - j - 1)·tile + 1)`` apart) or
    holds a sink. Every visited tile is partial (the mask is applied inside it)."""
    length = q.shape[-2]
    # one tile more than the length needs: a table dimension never has size 1, which would
    # specialize the graph (and recompile once the prompt passes one tile)
    tiles = (length + tile - 1) // tile + 1
    i = torch.arange(tiles, device=q.device).unsqueeze(-1)  # query tiles [N, 1]
    j = torch.arange(tiles, device=q.device).unsqueeze(0)  # key tiles [1, N]
    gap = torch.clamp((i - j - 1) * tile + 1, min=0)
    visit = (j <= i) & ((gap < window) | (j * tile < sinks)) & (j * tile < length)
    counts = visit.sum(-1, dtype=torch.int32)  # [N]
    order = torch.argsort((~visit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return BlockMask.from_kv_blocks(counts[None, None], order[None, None], BLOCK_SIZE=tile,
                                    mask_mod=_mask_mod(0, 0, window, sinks, 0, 0, 0),
                                    seq_lengths=(length, length), compute_q_blocks=False)


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
    if gqa:  # Inductor's CPU flex template (torch 2.13) reads grouped K / V of other layouts
        k, v = k.contiguous(), v.contiguous()  # wrongly (e.g. a rotary output): wrong numbers
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


def _mask_node(program, node: fx.Node, s: int, t: int, spec: list[int]) -> fx.Node:
    """A node rebuilding the shape's ``BlockMask`` from its tables, stored as constants."""
    built = block_mask(s, t, node.args[0].meta["val"].device, *spec)
    tables = [built.kv_num_blocks, built.kv_indices, built.full_kv_num_blocks,
              built.full_kv_indices]
    with program.graph.inserting_before(node):
        consts = [program.add_constant(x, "block_mask") if x is not None else None
                  for x in tables]
        return program.graph.call_function(from_blocks, (*consts, s, t, *built.BLOCK_SIZE,
                                                         *spec))


def lower_sparse_attention(program) -> int:
    """Rewrite the program's sparse ``llmcompile.attention`` nodes in place; how many."""
    graph = program.graph
    masks: dict[tuple, fx.Node] = {}
    count = 0
    for node in list(graph.nodes):
        found = _sparse(node)
        if found is None:
            continue
        q, k, v, scale, *spec = found
        s, t = q.meta["val"].shape[-2], k.meta["val"].shape[-2]
        mask = None
        if isinstance(s, int) and isinstance(t, int):
            if s > 1:
                key = (s, t, *spec)
                if key not in masks:
                    masks[key] = _mask_node(program, node, s, t, spec)
                mask = masks[key]
        elif str(s) == str(t) and not spec[2]:  # a prefill of symbolic length, a window
            key = (str(s), *spec)
            if key not in masks:
                with graph.inserting_before(node):
                    masks[key] = graph.call_function(window_block_mask, (q, *spec[:2]))
            mask = masks[key]
        else:
            continue  # symbolic and past keys or blocks: the masked SDPA reference
        with graph.inserting_before(node):
            new = graph.call_function(sparse_attention, (q, k, v, scale, *spec, mask))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count
