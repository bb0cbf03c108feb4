"""Fused ops that rules introduce, defined once: ``torch.ops.llmcompile.*``.

Each op is declared with a schema and its reference implementation registered as the
``CompositeImplicitAutograd`` kernel. That makes it survive pre-dispatch capture and
``torch.export`` as one node (so later rules and the ONNX lowering see it), while Inductor's
``compile_fx`` decomposes it into its reference math and fuses it with its neighbours.

Shapes: activations ``[..., D]``; attention ``q [B, Hq, S, E]``, ``k/v [B, Hkv, T, E]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["add_rms_norm", "attention", "attention_keep", "gelu_mul", "group_query_attention",
           "gather_nbits", "int4_linear", "int8_linear", "keep_pairs", "matmul_nbits",
           "packed_attention", "rms_norm", "rotary", "silu_mul"]

_lib = torch.library.Library("llmcompile", "DEF")  # noqa: TOR901 - one library, defined here


def _define(schema: str, fn) -> None:
    _lib.define(schema)
    _lib.impl(schema.split("(")[0], fn, "CompositeImplicitAutograd")


def _rms_norm_ref(x: Tensor, weight: Tensor, eps: float, offset: float = 0.0) -> Tensor:
    # computed in float32 like every reference RMSNorm, then cast back: [..., D]
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (weight.float() + offset) if offset else y * weight.float()).to(x.dtype)


def _add_rms_norm_ref(x: Tensor, residual: Tensor, weight: Tensor, eps: float, offset: float = 0.0
                      ) -> tuple[Tensor, Tensor]:
    s = x + residual
    return _rms_norm_ref(s, weight, eps, offset), s


def _rotary_ref(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [B, H, S, E]; cos/sin broadcast to it; rotate_half pairs (i, i + E/2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def _gelu_mul_ref(gate: Tensor, up: Tensor, approximate: str = "none") -> Tensor:
    return F.gelu(gate, approximate=approximate) * up


def _attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float,
                   causal: bool = False, window: int = 0, sinks: int = 0, block: int = 0,
                   local_blocks: int = 0, vertical_stride: int = 0) -> Tensor:
    """Scaled dot-product attention with a mask *description*.

    ``mask`` (bool, True = attend, or additive float) is applied as given; ``causal`` aligns the
    diagonal bottom-right (query i of S sees keys up to i + T - S, as with a KV cache); a
    ``window`` > 0 keeps only the last ``window`` keys of each query, plus the first ``sinks``.
    ``block`` > 0 is block-sparse (Phi-3-small style): positions fall in blocks of ``block``;
    a query keeps the keys of its own and the ``local_blocks - 1`` previous blocks, plus every
    block ``b`` with ``(b + 1) % vertical_stride == 0`` (strided "vertical" blocks).
    """
    if causal or window > 0 or block > 0:
        keep = attention_keep(q.shape[-2], k.shape[-2], q.device, causal, window, sinks, block,
                              local_blocks, vertical_stride)
        mask = keep if mask is None else _combine(mask, keep)
    # head counts are static in every model; bool() keeps a SymBool from reaching SDPA
    gqa = bool(q.shape[1] != k.shape[1])
    if isinstance(q.shape[2], int) and isinstance(k.shape[2], int):  # static: decode steps
        group = q.shape[1] // k.shape[1]
        if q.device.type == "cpu" and group * q.shape[2] <= DECODE_ROWS:
            return _decode_attention(q, k, v, mask, scale)
        if gqa:
            return _grouped_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


#: query rows per KV head up to which CPU attention is written as reductions (decode)
DECODE_ROWS = 16


def _stack_groups(q: Tensor, k: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Grouped-query attention without copying K and V once per query head.

    Query head ``h`` uses KV head ``h // group``, so the ``group`` query heads of one KV head
    become extra query rows of that head: ``q [B, H, S, D] -> [B, H_kv, group * S, D]``, the
    mask's rows repeated to match. (SDPA's ``enable_gqa`` is decomposed for the CPU kernels
    into ``repeat_interleave`` of K and V: the whole cache written and read ``group`` times per
    layer and step.) Static shapes only: a symbolic length would need guards on the views."""
    b, h, s, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    group = h // hkv
    q = q.contiguous().view(b, hkv, group * s, d)  # no copy for a decode step (S = 1)
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mb = mask.shape[0]
        if mask.shape[1] == 1:
            mask = mask.unsqueeze(2).expand(mb, 1, group, s, t).contiguous()
            mask = mask.view(mb, 1, group * s, t)
        else:
            mask = mask.expand(mb, h, s, t).contiguous().view(mb, hkv, group * s, t)
    return q, mask


def _grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                       scale: float) -> Tensor:
    b, h, s, _ = q.shape
    q2, mask = _stack_groups(q, k, mask)
    out = F.scaled_dot_product_attention(q2, k, v, attn_mask=mask, scale=scale)
    return out.view(b, h, s, out.shape[-1])


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                      scale: float) -> Tensor:
    """Attention of a few query rows (a decode step) as two reductions over the cache, in
    float32: Inductor fuses each into one loop over K or V (measured on SmolLM2's shapes,
    3 rows x 256 positions x 64: 24 us a layer, against 90 us for the CPU flash kernel, whose
    blocking is sized for long queries)."""
    b, h, s, _ = q.shape
    q2, mask = _stack_groups(q, k, mask)
    scores = (q2.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * scale
    if mask is not None:
        scores = (scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool
                  else scores + mask)
    p = torch.softmax(scores, dim=-1)
    if mask is not None:  # a fully masked row (left padding) attends to nothing: 0, as SDPA
        p = torch.where(scores.amax(-1, keepdim=True) == float("-inf"), 0.0, p)
    out = (p.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2)
    return out.to(q.dtype).view(b, h, s, out.shape[-1])


def attention_keep(s: int, t: int, device: torch.device | str = "cpu", causal: bool = True,
                   window: int = 0, sinks: int = 0, block: int = 0, local_blocks: int = 0,
                   vertical_stride: int = 0) -> Tensor:
    """The bool ``[S, T]`` keep-mask of a description (True = attend), bottom-right aligned."""
    qpos = torch.arange(s, device=device).unsqueeze(-1) + (t - s)  # [S, 1]
    kpos = torch.arange(t, device=device).unsqueeze(0)  # [1, T]
    return keep_pairs(qpos, kpos, causal, window, sinks, block, local_blocks, vertical_stride)


def keep_pairs(qpos: Tensor, kpos: Tensor, causal: bool = True, window: int = 0, sinks: int = 0,
               block: int = 0, local_blocks: int = 0, vertical_stride: int = 0) -> Tensor:
    """Whether query position ``qpos`` attends to key position ``kpos`` (broadcasting), under
    a mask description: the one definition the reference and FlexAttention's ``mask_mod``
    share."""
    keep = kpos <= qpos if causal else torch.ones_like(kpos, dtype=torch.bool)
    if window > 0:
        keep = keep & ((qpos - kpos < window) | (kpos < sinks))
    if block > 0:
        qb, kb = qpos // block, kpos // block
        strided = (kb + 1) % vertical_stride == 0 if vertical_stride > 0 else kb < 0
        keep = keep & ((qb - kb < local_blocks) | strided)
    return keep


def _combine(mask: Tensor, keep: Tensor) -> Tensor:
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def _int8_linear_ref(x: Tensor, weight: Tensor, scales: Tensor, bias: Tensor | None = None
                     ) -> Tensor:
    """``x [..., K] @ dequant(weight int8 [N, K], scales [N])ᵀ``; activations in the scales'
    dtype.

    ``aten._weight_int8pack_mm`` reads 1 byte per weight. Its fast activation dtype depends on
    the CPU (bf16 with AVX-512 BF16 / AMX, float32 on AVX2: :mod:`llmcompile.ops.cpu`); the
    quantize pass stores the scales in that dtype, x is cast to it and the result cast back.
    """
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(scales.dtype),
                                           weight, scales)
    y = y.reshape(*x.shape[:-1], weight.shape[0]).to(x.dtype)
    return y if bias is None else y + bias


def _int4_linear_ref(x: Tensor, weight: Tensor, scales_zeros: Tensor, group_size: int,
                     bias: Tensor | None = None) -> Tensor:
    """``x [..., K]`` times a CPU-packed int4 weight (``scales_zeros [K/G, N, 2]``, bf16 or
    float32: the activations take their dtype, chosen for the CPU like int8's)."""
    n = scales_zeros.shape[1]
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.reshape(-1, x.shape[-1]).to(scales_zeros.dtype), weight, group_size, scales_zeros)
    y = y.reshape(*x.shape[:-1], n).to(x.dtype)
    return y if bias is None else y + bias


def _group_query_attention_ref(q: Tensor, k: Tensor, v: Tensor, past_k: Tensor | None,
                               past_v: Tensor | None, scale: float, window: int = 0
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Causal attention of new tokens over a KV cache: ``(out, present_k, present_v)``.

    ``q [B, Hq, S, E]``, new ``k/v [B, Hkv, S, E]``, ``past_k/v [B, Hkv, P, E]`` (or None);
    ``present = cat(past, new)`` along the sequence; the diagonal is aligned bottom-right.
    """
    if past_k is not None and past_v is not None:
        k, v = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    else:
        k, v = k.clone(), v.clone()  # outputs never alias inputs
    return _attention_ref(q, k, v, None, scale, causal=True, window=window), k, v


def _packed_attention_ref(qkv: Tensor, past_k: Tensor | None, past_v: Tensor | None,
                          cos_cache: Tensor, sin_cache: Tensor, positions: Tensor, heads: int,
                          kv_heads: int, scale: float, window: int = 0,
                          past_like: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`group_query_attention` of a packed projection with the rotary inside:
    ``qkv [B, S, (Hq + 2·Hkv)·E]`` (queries, keys, values), rotary (halves) by
    ``cos_cache / sin_cache [P, E/2]`` at ``positions [B, S]``. Returns ``(out [B, Hq, S, E],
    present_k, present_v)`` like :func:`group_query_attention`. ``past_like``: a tensor whose
    dim 2 is the past length too (the first layer's past key), so that the ONNX file computes
    the sequence lengths once for all layers; the math does not read it."""
    b, s, width = qkv.shape
    e = width // (heads + 2 * kv_heads)
    q, k, v = qkv.split([heads * e, kv_heads * e, kv_heads * e], dim=-1)
    q, k, v = (t.reshape(b, s, -1, e).transpose(1, 2) for t in (q, k, v))
    cos = cos_cache[positions].repeat(1, 1, 2).unsqueeze(1).to(qkv.dtype)  # [B, 1, S, E]
    sin = sin_cache[positions].repeat(1, 1, 2).unsqueeze(1).to(qkv.dtype)
    return _group_query_attention_ref(_rotary_ref(q, cos, sin), _rotary_ref(k, cos, sin), v,
                                      past_k, past_v, scale, window)


def _unpack(data: Tensor, bits: int, rows: int) -> Tensor:
    """uint8 bytes -> one value per element (low nibble first for 4 bits), ``[rows, -1]``."""
    data = data.reshape(rows, -1)
    if bits == 8:
        return data
    return torch.stack([data & 15, data >> 4], dim=-1).reshape(rows, -1)


def _matmul_nbits_ref(x: Tensor, qweight: Tensor, scales: Tensor, zero_points: Tensor | None,
                      k: int, bits: int, block_size: int, accuracy_level: int = 0,
                      bias: Tensor | None = None) -> Tensor:
    """``x [..., K]`` times a block-quantized weight in ONNX Runtime's ``MatMulNBits`` layout.

    ``qweight`` uint8 ``[N, K/B, B·bits/8]`` (blocks along K, padded), ``scales [N·K/B]``,
    ``zero_points`` uint8 packed ``[N·ceil(K/B·bits/8)]`` or None (then ``2^(bits-1)``);
    ``w = (q - zero) * scale``. ``accuracy_level`` only tells ONNX Runtime which compute
    precision it may use (4: int8 activations); this reference computes in ``x``'s dtype.
    """
    n, blocks = qweight.shape[0], qweight.shape[1]
    q = _unpack(qweight, bits, n).reshape(n, blocks, block_size).float()
    if zero_points is None:
        zero = torch.full((n, blocks), float(2 ** (bits - 1)), device=x.device)
    else:
        zero = _unpack(zero_points, bits, n)[:, :blocks].float()
    w = (q - zero.unsqueeze(-1)) * scales.reshape(n, blocks, 1).float()
    w = w.reshape(n, blocks * block_size)[:, :k].to(x.dtype)
    return F.linear(x, w, bias)


def _gather_nbits_ref(qweight: Tensor, indices: Tensor, scales: Tensor,
                      zero_points: Tensor | None, k: int, bits: int, block_size: int) -> Tensor:
    """Rows ``indices`` of a block-quantized table in ``MatMulNBits``' layout (the same
    tensors as a tied LM head's), dequantized: ``[*indices.shape, K]`` in ``scales``' dtype.
    ONNX Runtime runs it as ``GatherBlockQuantized`` on those very bytes."""
    n, blocks = qweight.shape[0], qweight.shape[1]
    flat = indices.reshape(-1)
    q = _unpack(qweight[flat], bits, flat.numel()).reshape(-1, blocks, block_size).float()
    if zero_points is None:
        zero = torch.full((flat.numel(), blocks), float(2 ** (bits - 1)), device=q.device)
    else:
        zero = _unpack(zero_points.reshape(n, -1)[flat], bits, flat.numel())[:, :blocks].float()
    w = (q - zero.unsqueeze(-1)) * scales.reshape(n, blocks, 1)[flat].float()
    w = w.reshape(flat.numel(), blocks * block_size)[:, :k].to(scales.dtype)
    return w.reshape(*indices.shape, k)


_define("rms_norm(Tensor x, Tensor weight, float eps, float offset=0.0) -> Tensor", _rms_norm_ref)
_define("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, float offset=0.0)"
        " -> (Tensor, Tensor)", _add_rms_norm_ref)
_define("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor", _rotary_ref)
_define("silu_mul(Tensor gate, Tensor up) -> Tensor", _silu_mul_ref)
_define("gelu_mul(Tensor gate, Tensor up, str approximate='none') -> Tensor", _gelu_mul_ref)
_define("attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool causal=False,"
        " int window=0, int sinks=0, int block=0, int local_blocks=0, int vertical_stride=0)"
        " -> Tensor", _attention_ref)
_define("int8_linear(Tensor x, Tensor weight, Tensor scales, Tensor? bias=None) -> Tensor",
        _int8_linear_ref)
_define("int4_linear(Tensor x, Tensor weight, Tensor scales_zeros, int group_size,"
        " Tensor? bias=None) -> Tensor", _int4_linear_ref)

_define("group_query_attention(Tensor q, Tensor k, Tensor v, Tensor? past_k, Tensor? past_v,"
        " float scale, int window=0) -> (Tensor, Tensor, Tensor)", _group_query_attention_ref)
_define("matmul_nbits(Tensor x, Tensor qweight, Tensor scales, Tensor? zero_points, int k,"
        " int bits, int block_size, int accuracy_level=0, Tensor? bias=None) -> Tensor",
        _matmul_nbits_ref)
_define("packed_attention(Tensor qkv, Tensor? past_k, Tensor? past_v, Tensor cos_cache,"
        " Tensor sin_cache, Tensor positions, int heads, int kv_heads, float scale,"
        " int window=0, Tensor? past_like=None) -> (Tensor, Tensor, Tensor)",
        _packed_attention_ref)
_define("gather_nbits(Tensor qweight, Tensor indices, Tensor scales, Tensor? zero_points, int k,"
        " int bits, int block_size) -> Tensor", _gather_nbits_ref)

_ops = torch.ops.llmcompile
rms_norm = _ops.rms_norm
add_rms_norm = _ops.add_rms_norm
rotary = _ops.rotary
silu_mul = _ops.silu_mul
gelu_mul = _ops.gelu_mul
attention = _ops.attention
int8_linear = _ops.int8_linear
int4_linear = _ops.int4_linear
group_query_attention = _ops.group_query_attention
matmul_nbits = _ops.matmul_nbits
gather_nbits = _ops.gather_nbits
packed_attention = _ops.packed_attention
