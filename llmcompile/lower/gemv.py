"""Decode matmuls on a CPU: llmcompile's weight-streaming kernels for a few rows.

    aten.linear(x, W, b)                    ==>  gemv_f32(x, W, b)        W float32
    llmcompile.int8_linear(x, q, s, b)      ==>  gemv_int8(x, q, s32, b)  s32: s in float32, once
    llmcompile.int4_linear(x, P, sz, G, b)  ==>  gemv_int4(x, nib, scale, low, G, b)

only where ``x`` has a static shape of at most :data:`~llmcompile.ops.kernels.MAX_ROWS` rows
(a decode step, a draft, a verification), lives on the CPU in float32, and ``W`` / ``q`` are
weights of the program (contiguous, ``K`` a multiple of two vector widths). Prefill graphs,
symbolic shapes, GPUs and other dtypes keep ATen; so does everything when the kernels cannot be
built (:mod:`llmcompile.ops.kernels`). The float and int8 kernels compute in float32 (ATen's
packed int8 kernel rounds the activations to bfloat16). The int4 kernel takes its own layout
(two values of a group per byte, float16 scale and offset), unpacked once from ATen's packed
weight through ATen's own kernel (so it is the same weight) and kept while that weight lives:
the prefill graph keeps ATen's pack, so an int4 model holds its int4 weights twice on a CPU
with these kernels. It quantizes activations to int8 per (row, group), as llama.cpp does, and
sums integer products exactly (AVX-512 VNNI, AVX-VNNI or AVX2); group sizes must be multiples
of 64.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from ..ops import cpu, kernels

__all__ = ["gemv_f32", "gemv_int4", "gemv_int8", "lower_cpu_gemv", "unpack_int4"]

_LINEAR = torch.ops.aten.linear.default
_INT8 = torch.ops.llmcompile.int8_linear.default
_INT4 = torch.ops.llmcompile.int4_linear.default
_INT4_GROUP = 64  # the int4 kernel's group sizes are multiples of this


def gemv_f32(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.ops.llmcompile_cpu.linear_f32(x.reshape(-1, x.shape[-1]).contiguous(), w)
    y = y.reshape(*x.shape[:-1], w.shape[0])
    return y if bias is None else y + bias


def gemv_int8(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.ops.llmcompile_cpu.linear_int8(x.reshape(-1, x.shape[-1]).contiguous(), q, scales)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


def gemv_int4(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
              group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    y = torch.ops.llmcompile_cpu.linear_int4(x.reshape(-1, x.shape[-1]).contiguous(), q, scale,
                                             low, group_size)
    y = y.reshape(*x.shape[:-1], q.shape[0])
    return y if bias is None else y + bias


_UNPACKED = cpu.INT4_LAYOUTS  # ATen int4 pack -> (nibbles, scale, low), while it lives


def unpack_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATen's CPU int4 pack -> the int4 kernel's layout. The values come from ATen's own kernel
    (an identity times the pack with unit scales: exact small integers), so the layout of the
    pack needs no knowing; ``w = (q - 8) * scale + zero`` gives ``low = zero - 8 * scale``."""
    if packed in _UNPACKED:
        return _UNPACKED[packed]
    n, k = packed.shape[0], packed.shape[1] * 2
    with torch.no_grad():
        unit = torch.stack([torch.ones(k // group_size, n), torch.full((k // group_size, n), 8.0)],
                           dim=-1).to(torch.bfloat16)
        eye = torch.eye(k, dtype=torch.bfloat16)
        q = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, unit)
        q = q.float().round().to(torch.uint8).T.contiguous()  # [N, K], values 0..15
        nib, scale, low = cpu.int4_kernel_layout(q, scales_zeros, group_size)
    _UNPACKED[packed] = (nib, scale, low)
    return nib, scale, low


def _rows(x: fx.Node) -> int | None:
    """Rows of a float32 CPU activation whose rows are static, else None (its width is checked
    against the weight's)."""
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or val.dtype != torch.float32 or val.device.type != "cpu":
        return None
    if val.dim() < 2 or not all(isinstance(d, int) for d in val.shape[:-1]):
        return None
    return math.prod(val.shape[:-1])


def _weight_ok(w: torch.Tensor | None, dtype: torch.dtype, k: int) -> bool:
    return (w is not None and w.dim() == 2 and w.dtype == dtype and w.device.type == "cpu"
            and w.is_contiguous() and w.shape[1] == k)


def _candidates(program) -> list[tuple[fx.Node, int]]:
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function" or node.target not in (_LINEAR, _INT8, _INT4):
            continue
        if node.kwargs or len(node.args) < 2:
            continue
        rows = _rows(node.args[0])
        if rows is not None and 0 < rows <= kernels.MAX_ROWS:
            found.append((node, rows))
    return found


def lower_cpu_gemv(program) -> int:
    """Rewrite the program's small static CPU linears in place; how many."""
    found = _candidates(program)
    if not found or not kernels.available():
        return 0
    step = 2 * kernels.vector_width()
    graph = program.graph
    float_scales: dict[str, fx.Node] = {}
    count = 0
    for node, _ in found:
        x, w_node = node.args[0], node.args[1]
        w = program.weight(w_node) if program.is_weight(w_node) else None
        if w is None or w.dim() != 2:
            continue
        k = w.shape[1] * (2 if node.target is _INT4 else 1)
        if k % step:
            continue
        if node.target is _LINEAR:
            if not _weight_ok(w, torch.float32, k):
                continue
            args = (x, w_node, *node.args[2:3])
            fn = gemv_f32
        elif node.target is _INT4:
            sz_node, group = node.args[2], node.args[3]
            sz = program.weight(sz_node) if program.is_weight(sz_node) else None
            if (w is None or sz is None or not isinstance(group, int) or group % _INT4_GROUP
                    or w.dtype != torch.uint8 or w.shape[1] * 2 != k):
                continue
            tensors = unpack_int4(w, sz, group)
            with graph.inserting_before(node):
                consts = [program.add_constant(t, hint) for t, hint in
                          zip(tensors, ("int4_nibbles", "int4_scale", "int4_low"), strict=True)]
            args = (x, *consts, group, *node.args[4:5])
            fn = gemv_int4
        else:
            s_node = node.args[2]
            scales = program.weight(s_node) if program.is_weight(s_node) else None
            if not _weight_ok(w, torch.int8, k) or scales is None:
                continue
            if s_node.name not in float_scales:
                with graph.inserting_before(node):
                    float_scales[s_node.name] = program.add_constant(
                        scales.float().contiguous(), "scales_f32")
            args = (x, w_node, float_scales[s_node.name], *node.args[3:4])
            fn = gemv_int8
        with graph.inserting_before(node):
            new = graph.call_function(fn, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    return count
