"""ONNX translations of the fused ops: each op, translated once, for ``torch.onnx.export``.

    llmcompile.rms_norm               ==>  SimplifiedLayerNormalization          (onnx domain)
    llmcompile.add_rms_norm           ==>  com.microsoft.SkipSimplifiedLayerNormalization
    llmcompile.rotary                 ==>  RotaryEmbedding (ONNX opset 23, per-token caches)
    llmcompile.group_query_attention  ==>  com.microsoft.GroupQueryAttention
    llmcompile.packed_attention       ==>  com.microsoft.GroupQueryAttention (packed, do_rotary)
    llmcompile.matmul_nbits           ==>  com.microsoft.MatMulNBits (4 and 8 bit)
    llmcompile.gather_nbits           ==>  com.microsoft.GatherBlockQuantized (same bytes)

Ops without an entry here (``attention`` with a mask, ``silu_mul``, ...) are decomposed by the
exporter into standard ONNX ops from their reference implementation. Which contrib ops a
provider runs, and for which dtypes, is in :data:`SUPPORT`; :func:`translation_table` leaves
out what the chosen provider cannot run and says so.

ONNX Runtime's contrib ops have no schema in ``onnx.defs``; :func:`register_schemas` adds the
ones used here so that onnxscript can build them and ``onnx.checker`` can check them.
"""

from __future__ import annotations

import torch

__all__ = ["SUPPORT", "register_schemas", "translation_table"]

MSFT = "com.microsoft"
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_F32, _F16, _BF16 = torch.float32, torch.float16, torch.bfloat16

#: ONNX op -> provider -> dtypes its kernel runs in ONNX Runtime (1.2x-1.3x)
SUPPORT: dict[str, dict[str, set]] = {
    "SimplifiedLayerNormalization": {CPU: {_F32, _F16}, CUDA: {_F32, _F16, _BF16}},
    "SkipSimplifiedLayerNormalization": {CPU: {_F32, _F16}, CUDA: {_F32, _F16, _BF16}},
    "RotaryEmbedding": {CPU: {_F32, _F16}, CUDA: {_F32, _F16, _BF16}},
    "GroupQueryAttention": {CPU: {_F32, _F16}, CUDA: {_F16, _BF16}},
    "MatMulNBits": {CPU: {_F32, _F16}, CUDA: {_F32, _F16, _BF16}},
    # CUDA has a kernel too, not measured here yet: standard ops there until it is
    "GatherBlockQuantized": {CPU: {_F32, _F16}},
}

_registered = False


def supported(onnx_op: str, provider: str, dtype: torch.dtype) -> bool:
    return dtype in SUPPORT[onnx_op].get(provider, set())


def register_schemas() -> None:
    """Register the contrib-op schemas used by the translations with ``onnx.defs`` (once)."""
    global _registered
    if _registered:
        return
    from onnx import defs

    S = defs.OpSchema
    one, opt = S.FormalParameterOption.Single, S.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]

    def schema(name, domain, inputs, outputs, types, attrs, doc):
        try:
            defs.get_schema(name, 1, domain)
            return  # already known (registered earlier, or by a newer onnx)
        except defs.SchemaError:
            pass
        defs.register_schema(S(
            name, domain, 1, doc=doc,
            inputs=[S.FormalParameter(n, t, param_option=o) for n, t, o in inputs],
            outputs=[S.FormalParameter(n, t, param_option=o) for n, t, o in outputs],
            type_constraints=[(t, allowed, "") for t, allowed in types.items()],
            attributes=[S.Attribute(a, kind, "", required=False) for a, kind in attrs]))

    A = S.AttrType
    schema("SimplifiedLayerNormalization", "",
           [("X", "T", one), ("scale", "V", one)],
           [("Y", "V", one), ("inv_std_var", "U", opt)],
           {"T": floats, "U": floats, "V": floats},
           [("axis", A.INT), ("epsilon", A.FLOAT), ("stash_type", A.INT)],
           "RMSNorm (ONNX Runtime)")
    schema("SkipSimplifiedLayerNormalization", MSFT,
           [("input", "T", one), ("skip", "T", one), ("gamma", "T", one), ("bias", "T", opt)],
           [("output", "T", one), ("mean", "U", opt), ("inv_std_var", "U", opt),
            ("input_skip_bias_sum", "T", opt)],
           {"T": floats, "U": floats}, [("epsilon", A.FLOAT)],
           "RMSNorm of input + skip (ONNX Runtime contrib)")
    schema("GroupQueryAttention", MSFT,
           [("query", "T", one), ("key", "T", opt), ("value", "T", opt),
            ("past_key", "T", opt), ("past_value", "T", opt), ("seqlens_k", "M", one),
            ("total_sequence_length", "M", one), ("cos_cache", "T", opt),
            ("sin_cache", "T", opt), ("position_ids", "P", opt)],
           [("output", "T", one), ("present_key", "T", one), ("present_value", "T", one)],
           {"T": floats, "M": ["tensor(int32)"], "P": ["tensor(int64)"]},
           [("num_heads", A.INT), ("kv_num_heads", A.INT), ("scale", A.FLOAT),
            ("local_window_size", A.INT), ("do_rotary", A.INT), ("rotary_interleaved", A.INT)],
           "Causal grouped-query attention with a KV cache (ONNX Runtime contrib)")
    schema("MatMulNBits", MSFT,
           [("A", "T1", one), ("B", "T2", one), ("scales", "T1", one),
            ("zero_points", "T3", opt)],
           [("Y", "T1", one)],
           {"T1": floats, "T2": ["tensor(uint8)"], "T3": ["tensor(uint8)", *floats]},
           [("K", A.INT), ("N", A.INT), ("bits", A.INT), ("block_size", A.INT),
            ("accuracy_level", A.INT)],
           "Block-quantized weight matmul (ONNX Runtime contrib)")
    schema("GatherBlockQuantized", MSFT,
           [("data", "T1", one), ("indices", "Tind", one), ("scales", "T2", one),
            ("zero_points", "T1", opt)],
           [("output", "T2", one)],
           {"T1": ["tensor(uint8)", "tensor(int4)", "tensor(uint4)"], "T2": floats,
            "Tind": ["tensor(int32)", "tensor(int64)"]},
           [("gather_axis", A.INT), ("quantize_axis", A.INT), ("block_size", A.INT),
            ("bits", A.INT)],
           "Gather from a block-quantized table (ONNX Runtime contrib)")
    _registered = True


# --- translations (onnxscript, traced by torch.onnx.export) ----------------------------------

def _opsets():
    import onnxscript
    from onnxscript import opset23

    return opset23, onnxscript.values.Opset(MSFT, 1)


def _rms_norm(x, weight, eps: float, offset: float = 0.0):
    op, _ = _opsets()
    if offset:
        weight = op.Add(weight, op.CastLike(op.Constant(value_float=offset), weight))
    y, _ = op.SimplifiedLayerNormalization(x, weight, axis=-1, epsilon=eps, stash_type=1)
    return y


def _add_rms_norm(x, residual, weight, eps: float, offset: float = 0.0):
    op, msft = _opsets()
    if offset:
        weight = op.Add(weight, op.CastLike(op.Constant(value_float=offset), weight))
    rank = len(x.shape) if getattr(x, "shape", None) is not None else 3
    if rank > 3:  # the kernel takes [B, S, D] or [N, D]: a per-head norm is [B, H, S, D]
        shape = op.Shape(x)
        rows = op.Concat(op.Constant(value_ints=[-1]), op.Shape(x, start=-1), axis=0)
        x, residual = op.Reshape(x, rows), op.Reshape(residual, rows)
    out, _, _, total = msft.SkipSimplifiedLayerNormalization(x, residual, weight, None,
                                                             epsilon=eps)
    if rank > 3:
        out, total = op.Reshape(out, shape), op.Reshape(total, shape)
    return out, total


def _silu_mul(gate, up):
    op, _ = _opsets()
    return op.Mul(op.Mul(gate, op.Sigmoid(gate)), up)


def _gelu_mul(gate, up, approximate: str = "none"):
    """GELU written out (erf or tanh form): the patterns ONNX Runtime fuses into its Gelu /
    FastGelu kernels."""
    op, _ = _opsets()

    def const(value: float):
        return op.CastLike(op.Constant(value_float=value), gate)

    if approximate == "tanh":
        cube = op.Mul(const(0.044715), op.Mul(gate, op.Mul(gate, gate)))
        inner = op.Tanh(op.Mul(const(0.7978845608028654), op.Add(gate, cube)))
    else:
        inner = op.Erf(op.Div(gate, const(1.4142135623730951)))
    gelu = op.Mul(gate, op.Mul(const(0.5), op.Add(inner, const(1.0))))
    return op.Mul(gelu, up)


def _dim(op, x, axis: int):
    return op.Shape(x, start=axis, end=axis + 1)


def _rotary(x, cos, sin):
    """x [B, H, S, E]; cos/sin broadcast to it with duplicated halves -> caches [B, S, E/2]."""
    op, _ = _opsets()
    half = x.shape[-1] // 2
    target = op.Concat(_dim(op, x, 0), _dim(op, x, 2), op.Constant(value_ints=[half]), axis=0)

    def cache(c):
        rank = len(c.shape)
        c = op.Slice(c, op.Constant(value_ints=[0]), op.Constant(value_ints=[half]),
                     op.Constant(value_ints=[-1]))
        if rank == 4:  # [B|1, 1, S, E/2]
            c = op.Squeeze(c, op.Constant(value_ints=[1]))
        elif rank == 2:  # [S, E/2]
            c = op.Unsqueeze(c, op.Constant(value_ints=[0]))
        return op.Expand(c, target)

    return op.RotaryEmbedding(x, cache(cos), cache(sin))


def _to_bsd(op, x):
    """[B, H, S, E] -> [B, S, H*E]."""
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))


def _group_query_attention(q, k, v, past_k, past_v, scale: float, window: int = 0):
    op, msft = _opsets()
    heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[3]
    total = _dim(op, k, 2)
    if past_k is not None:
        total = op.Add(total, _dim(op, past_k, 2))
    seqlens = op.Expand(op.Sub(total, op.Constant(value_ints=[1])), _dim(op, q, 0))
    total = op.Squeeze(total, op.Constant(value_ints=[0]))
    out, present_k, present_v = msft.GroupQueryAttention(
        _to_bsd(op, q), _to_bsd(op, k), _to_bsd(op, v), past_k, past_v,
        op.Cast(seqlens, to=6), op.Cast(total, to=6),
        num_heads=int(heads), kv_num_heads=int(kv_heads), scale=float(scale),
        local_window_size=int(window) if window > 0 else -1)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, int(heads), int(head_dim)]))
    return op.Transpose(out, perm=[0, 2, 1, 3]), present_k, present_v


def _packed_attention(qkv, past_k, past_v, cos_cache, sin_cache, positions, heads: int,
                      kv_heads: int, scale: float, window: int = 0, past_like=None):
    """One GroupQueryAttention on the packed projection, rotary inside (``do_rotary``); the
    lengths from ``positions`` and ``past_like`` (inputs every layer shares: one computation
    after ONNX Runtime's common-subexpression elimination)."""
    op, msft = _opsets()
    head_dim = qkv.shape[-1] // (heads + 2 * kv_heads)
    total = _dim(op, positions, 1)
    past = past_like if past_like is not None else past_k
    if past is not None:
        total = op.Add(total, _dim(op, past, 2))
    seqlens = op.Expand(op.Sub(total, op.Constant(value_ints=[1])), _dim(op, positions, 0))
    total = op.Squeeze(total, op.Constant(value_ints=[0]))
    out, present_k, present_v = msft.GroupQueryAttention(
        qkv, None, None, past_k, past_v, op.Cast(seqlens, to=6), op.Cast(total, to=6),
        cos_cache, sin_cache, positions, num_heads=int(heads), kv_num_heads=int(kv_heads),
        scale=float(scale), local_window_size=int(window) if window > 0 else -1, do_rotary=1,
        rotary_interleaved=0)
    out = op.Reshape(out, op.Constant(value_ints=[0, 0, int(heads), int(head_dim)]))
    return op.Transpose(out, perm=[0, 2, 1, 3]), present_k, present_v


def _matmul_nbits(x, qweight, scales, zero_points, k: int, bits: int, block_size: int,
                  accuracy_level: int = 0, bias=None):
    op, msft = _opsets()
    y = msft.MatMulNBits(x, qweight, scales, zero_points, K=int(k), N=int(qweight.shape[0]),
                         bits=int(bits), block_size=int(block_size),
                         accuracy_level=int(accuracy_level))
    return y if bias is None else op.Add(y, bias)


def _gather_nbits(qweight, indices, scales, zero_points, k: int, bits: int, block_size: int):
    """MatMulNBits' tensors read as GatherBlockQuantized's ([N, K·bits/8], [N, K/B], zero
    points [N, ceil(K/B·bits/8)]): reshapes of the same initializers, no second copy."""
    op, msft = _opsets()
    rows = op.Constant(value_ints=[int(qweight.shape[0]), -1])
    if zero_points is not None:
        zero_points = op.Reshape(zero_points, rows)
    return msft.GatherBlockQuantized(op.Reshape(qweight, rows), indices,
                                     op.Reshape(scales, rows), zero_points, gather_axis=0,
                                     quantize_axis=1, block_size=int(block_size),
                                     bits=int(bits))


_TRANSLATIONS = {
    "rms_norm": ("SimplifiedLayerNormalization", _rms_norm),
    "add_rms_norm": ("SkipSimplifiedLayerNormalization", _add_rms_norm),
    "rotary": ("RotaryEmbedding", _rotary),
    "group_query_attention": ("GroupQueryAttention", _group_query_attention),
    "packed_attention": ("GroupQueryAttention", _packed_attention),
    "matmul_nbits": ("MatMulNBits", _matmul_nbits),
    "gather_nbits": ("GatherBlockQuantized", _gather_nbits),
}


def _split_with_sizes(x, split_sizes, dim: int = 0):
    """One ``Split`` into equal parts (a packed gate / up projection), else a ``Slice`` per
    part: the exporter's own translation is a sequence (``SplitToSequence`` and a
    ``SequenceAt`` per part)."""
    op, _ = _opsets()
    sizes = [int(n) for n in split_sizes]
    if len(set(sizes)) == 1:
        return op.Split(x, axis=int(dim), num_outputs=len(sizes))
    axes, start, parts = op.Constant(value_ints=[int(dim)]), 0, []
    for size in sizes:
        parts.append(op.Slice(x, op.Constant(value_ints=[start]),
                              op.Constant(value_ints=[start + size]), axes))
        start += size
    return tuple(parts)


def translation_table(provider: str, dtype: torch.dtype) -> tuple[dict, list[str]]:
    """``custom_translation_table`` for ``provider`` and model ``dtype``, plus notes on what
    is emitted as standard ONNX ops because the provider has no kernel for it."""
    register_schemas()
    table = {torch.ops.aten.split_with_sizes.default: _split_with_sizes,
             torch.ops.llmcompile.silu_mul.default: _silu_mul,
             torch.ops.llmcompile.gelu_mul.default: _gelu_mul}
    notes: list[str] = []
    for name, (onnx_op, fn) in _TRANSLATIONS.items():
        if supported(onnx_op, provider, dtype):
            table[getattr(torch.ops.llmcompile, name).default] = fn
        else:
            notes.append(f"llmcompile.{name}: {provider} has no {onnx_op} kernel for {dtype}; "
                         "emitted as standard ONNX ops")
    return table, notes
