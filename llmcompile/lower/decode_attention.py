"""Decode attention on a CPU: llmcompile's kernel for a few query rows over a KV cache.

    llmcompile.attention(q, k, v, mask, c, causal)  ==>  decode_attention(q, k, v, mask, c, causal)

only where the shapes are static, q / k / v are float32 CPU tensors, at most
:data:`~llmcompile.ops.DECODE_ROWS` query rows share a KV head (a decode step, a draft, a
verification) and the attention is dense (a window or blocks go to :mod:`.flex`). The kernel
(``csrc/attention.cpp``) skips the keys the mask drops without reading them, so a static cache
costs the positions in use rather than its length, and reads each KV head once for the query
heads that share it. Without the kernels (:mod:`llmcompile.ops.kernels`), Inductor keeps the
reference (two fused reductions).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..core.pattern import arguments
from ..ops import DECODE_ROWS, kernels

__all__ = ["decode_attention", "lower_decode_attention"]

_ATTENTION = torch.ops.llmcompile.attention.default


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None, scale: float, causal: bool) -> torch.Tensor:
    return torch.ops.llmcompile_cpu.decode_attention(q, k, v, mask, scale, causal)


def _static(node) -> torch.Tensor | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if (not isinstance(val, torch.Tensor) or val.device.type != "cpu" or val.dim() != 4
            or not all(isinstance(d, int) for d in val.shape)):
        return None
    return val


def _candidate(node: fx.Node) -> tuple | None:
    if node.op != "call_function" or node.target is not _ATTENTION:
        return None
    q, k, v, mask, scale, causal, window, _sinks, block, *_ = arguments(node)
    if window or block or not isinstance(scale, (int, float)) or not isinstance(causal, bool):
        return None
    qv, kv, vv = _static(q), _static(k), _static(v)
    if qv is None or kv is None or vv is None:
        return None
    if any(t.dtype != torch.float32 for t in (qv, kv, vv)):
        return None
    b, h, s, _ = qv.shape
    hkv, t = kv.shape[1], kv.shape[2]
    if hkv == 0 or h % hkv or (h // hkv) * s > DECODE_ROWS:
        return None
    if mask is not None:
        mv = mask.meta.get("val") if isinstance(mask, fx.Node) else None
        if (not isinstance(mv, torch.Tensor) or mv.dtype not in (torch.bool, torch.float32)
                or mv.dim() > 4 or not all(isinstance(d, int) for d in mv.shape)):
            return None
        try:
            if torch.broadcast_shapes(mv.shape, (b, h, s, t)) != (b, h, s, t):
                return None
        except RuntimeError:
            return None
    return q, k, v, mask, float(scale), causal


def lower_decode_attention(program) -> int:
    """Rewrite the program's decode attentions in place; how many."""
    found = [(node, args) for node in program.graph.nodes
             if (args := _candidate(node)) is not None]
    if not found or not kernels.available():
        return 0
    graph = program.graph
    for node, args in found:
        with graph.inserting_before(node):
            new = graph.call_function(decode_attention, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    return len(found)
