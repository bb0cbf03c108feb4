"""Weight-only quantization math (compile-time, on real weights).

* int8: per-output-channel symmetric, ``w ≈ q * s``, ``q ∈ [-127, 127]``.
* int4: grouped asymmetric along the input dim, ``w ≈ q * scale + low``, ``q ∈ [0, 15]``.
* AWQ-style search: per-input-channel scales ``s = mean|x|^α`` (α on a grid, α = 0 is plain
  round-to-nearest) and a clipping ratio, chosen to minimise ``‖x Wᵀ − x Ŵᵀ‖²`` on calibration
  activations; ``Ŵ = Q(W·s)/s``, and the graph divides ``x`` by ``s`` at run time.
* CPU packing for ``aten._weight_int8pack_mm`` / ``aten._weight_int4pack_mm_for_cpu``, and
  ONNX Runtime's ``MatMulNBits`` layout (blocks along K, integer zero points).

Weights are ``[N, K]`` (out, in) as in ``aten.linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NBITS_INT8_BLOCK", "Int4Weight", "awq_search", "dequantize_int4", "gptq_int4",
           "int4_nbits", "int8_nbits", "quantize_int4", "quantize_int8"]

NBITS_INT8_BLOCK = 32


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """``(q int8 [N, K], scale float32 [N])`` with ``w ≈ q * scale[:, None]``."""
    scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


@dataclass
class Int4Weight:
    """Grouped asymmetric int4: ``w[n, g*G:(g+1)*G] ≈ q * scale[n, g] + low[n, g]``."""

    q: Tensor  # uint8 values in [0, 15], [N, K]
    scale: Tensor  # [N, K / G]
    low: Tensor  # [N, K / G]
    group_size: int

    def dequantize(self) -> Tensor:
        n, k = self.q.shape
        g = self.q.view(n, k // self.group_size, self.group_size).float()
        return (g * self.scale[..., None] + self.low[..., None]).view(n, k)

    def pack_cpu(self, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
        """(packed weight, scales_and_zeros [K/G, N, 2] in ``dtype``, the activations' dtype)
        for ``_weight_int4pack_mm_for_cpu``.

        The kernel computes ``w = (q - 8) * scale + zero``, so ``zero = low + 8 * scale``.
        """
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.q.to(torch.int32), 1)
        zero = self.low + 8.0 * self.scale
        sz = torch.stack([self.scale, zero], dim=-1).transpose(0, 1).contiguous()
        return packed, sz.to(dtype)


def _range(hi: Tensor, lo: Tensor, integer_zero: bool) -> tuple[Tensor, Tensor]:
    """(scale, low) of a group range; with ``integer_zero`` the range includes 0 and
    ``low = -zero * scale`` for an integer ``zero`` in [0, 15] (ONNX Runtime's layout)."""
    if integer_zero:
        hi, lo = hi.clamp(min=0), lo.clamp(max=0)
    scale = ((hi - lo) / 15.0).clamp(min=1e-8)
    if integer_zero:
        lo = -torch.round(-lo / scale).clamp(0, 15) * scale
    return scale, lo


def quantize_int4(w: Tensor, group_size: int, clip: float = 1.0, integer_zero: bool = False
                  ) -> Int4Weight:
    """Round-to-nearest int4 with an offset per group; ``clip`` shrinks the range."""
    n, k = w.shape
    g = w.float().view(n, k // group_size, group_size)
    hi, lo = g.amax(-1), g.amin(-1)
    if clip < 1.0:
        mid = (hi + lo) / 2
        hi, lo = mid + (hi - mid) * clip, mid + (lo - mid) * clip
    scale, lo = _range(hi, lo, integer_zero)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.view(n, k), scale, lo, group_size)


def _pack_nibbles(values: Tensor) -> Tensor:
    """uint8 values in [0, 15], ``[..., 2m]`` -> bytes ``[..., m]``, low nibble first."""
    return (values[..., 0::2] | (values[..., 1::2] << 4)).to(torch.uint8)


def int4_nbits(w: Int4Weight, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """``(qweight [N, K/G, G/2], scales [N·K/G], zero_points [N·ceil(K/G/2)])`` for
    ``MatMulNBits`` (bits = 4, block = G); needs integer zero points (``integer_zero``)."""
    n, k = w.q.shape
    blocks = k // w.group_size
    zero = torch.round(-w.low / w.scale).clamp(0, 15).to(torch.uint8)  # [N, K/G]
    if not torch.allclose(-zero.float() * w.scale, w.low, atol=1e-6, rtol=1e-4):
        raise ValueError("int4 weight has fractional zero points; quantize with integer_zero")
    if blocks % 2:
        zero = torch.cat([zero, torch.zeros(n, 1, dtype=torch.uint8)], dim=1)
    qweight = _pack_nibbles(w.q.view(n, blocks, w.group_size))
    return qweight, w.scale.to(dtype).reshape(-1), _pack_nibbles(zero).reshape(-1)


def int8_nbits(q: Tensor, scale: Tensor, dtype: torch.dtype, block: int = NBITS_INT8_BLOCK
               ) -> tuple[Tensor, Tensor]:
    """Per-channel symmetric int8 (``q [N, K]``, ``scale [N]``) as ``MatMulNBits`` bits = 8:
    ``(qweight uint8 [N, ceil(K/B), B], scales [N·ceil(K/B)])``; zero point 128 (default)."""
    n, k = q.shape
    blocks = -(-k // block)
    u = torch.full((n, blocks * block), 128, dtype=torch.uint8)
    u[:, :k] = (q.to(torch.int16) + 128).to(torch.uint8)
    return u.view(n, blocks, block), scale.to(dtype)[:, None].expand(n, blocks).reshape(-1)


def dequantize_int4(w: Tensor, group_size: int, clip: float = 1.0) -> Tensor:
    return quantize_int4(w, group_size, clip).dequantize()


def _error(x: Tensor, w: Tensor, w_hat: Tensor) -> float:
    return float((x @ (w_hat - w).T).pow(2).mean())


def awq_search(w: Tensor, x_absmean: Tensor, x: Tensor, group_size: int, grid: int = 11,
               clips: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85)) -> tuple[Tensor, float]:
    """Best per-input-channel scales ``s [K]`` and clip ratio for int4 on activations ``x``.

    ``x`` is a sample of calibration inputs ``[R, K]``; ``x_absmean`` is ``mean|x|`` per channel
    over all calibration tokens. α = 0 with clip 1.0 is round-to-nearest, so the result is never
    worse than RTN on the calibration sample.
    """
    w = w.float()
    x = x.float()
    base = x_absmean.float().clamp(min=1e-5)
    best = (_error(x, w, dequantize_int4(w, group_size)), torch.ones_like(base), 1.0)
    for i in range(grid):
        alpha = i / (grid - 1)
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        for clip in clips:
            err = _error(x, w, dequantize_int4(w * s, group_size, clip) / s)
            if err < best[0]:
                best = (err, s, clip)
    return best[1], best[2]


def gptq_int4(w: Tensor, xtx: Tensor, group_size: int, damp: float = 0.01,
              scales: Tensor | None = None, integer_zero: bool = False) -> Int4Weight:
    """GPTQ-style int4: quantize column by column, feeding each column's rounding error back
    into the columns not yet quantized, weighted by the inverse Hessian ``(XᵀX)⁻¹``.

    ``xtx [K, K]`` is ``Σ xᵀx`` over calibration inputs. Group ranges (scale, low) are taken
    from the error-corrected weights as each group starts. With ``scales`` (AWQ) the weight is
    ``W·s`` and the Hessian is that of ``x / s``.
    """
    w = w.float().clone()
    h = xtx.double().clone()
    if scales is not None:
        w = w * scales
        h = h / scales.double()[:, None] / scales.double()[None, :]
    n, k = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)),
                                 upper=True).float()
    q = torch.zeros(n, k, dtype=torch.uint8)
    scale = torch.zeros(n, k // group_size)
    low = torch.zeros(n, k // group_size)
    for b0 in range(0, k, group_size):  # one block per group; errors flow within the block,
        b1 = b0 + group_size            # then to later columns with one matmul (lazy update)
        block = w[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        h_block = hinv[b0:b1, b0:b1]
        g = b0 // group_size
        scale[:, g], low[:, g] = _range(block.amax(1), block.amin(1), integer_zero)
        lo = low[:, g]
        for j in range(group_size):
            col = block[:, j]
            qj = torch.round((col - lo) / scale[:, g]).clamp(0, 15)
            q[:, b0 + j] = qj.to(torch.uint8)
            err = (col - (qj * scale[:, g] + lo)) / h_block[j, j]
            block[:, j:] -= err[:, None] * h_block[j, j:][None, :]
            errors[:, j] = err
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return Int4Weight(q, scale, low, group_size)
