"""RMSNorm, and the residual add that feeds it.

    x * rsqrt(mean(x², -1) + eps) * w                ==>  llmcompile.rms_norm(x, w, eps)
    x * rsqrt(mean(x², -1) + eps) * (w + offset)     ==>  llmcompile.rms_norm(x, w, eps, offset)
    s = a + b;  (rms_norm(s, w, eps, offset), s)     ==>  llmcompile.add_rms_norm(a, b, w, eps,
                                                                                 offset)

The first is Llama's spelling (also Qwen2, Mistral, Phi-3), the second Gemma's ``(1 + w)``.
In half precision both normalize in float32 and cast back (``*_bf16``, ``*_fp16`` variants);
Llama casts before scaling by ``w``, the fused op after (one rounding instead of two).
``rmsnorm_offset`` runs first: otherwise ``rmsnorm`` would match Gemma too, with ``w + 1`` as
its weight (still correct, but the offset would hide in a folded constant). ``add_rmsnorm``
matches the *fused* op, so it composes with both spellings and runs after them.
"""

from __future__ import annotations

import torch

from llmcompile import ops
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_EXAMPLE = {"x": (2, 3, 8), "w": (8,)}


# --- patterns -------------------------------------------------------------------------------

def rmsnorm(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rmsnorm_offset(x, w, eps: float, offset: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (w + offset)


def rmsnorm_upcast(dtype: torch.dtype):
    """LlamaRMSNorm on a half-precision x: statistics in float32, cast back, then scale."""
    def pattern(x, w, eps: float):
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return pattern


def rmsnorm_offset_upcast(dtype: torch.dtype):
    """GemmaRMSNorm on a half-precision x: all in float32, cast back at the end."""
    def pattern(x, w, eps: float, offset: float):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (y * (w.float() + offset)).type_as(x)
    return pattern


def add_rmsnorm(x, residual, w, eps: float, offset: float):
    s = x + residual  # [..., D]
    return ops.rms_norm(s, w, eps, offset), s


# --- checks ---------------------------------------------------------------------------------

def _norm_check(m: Match) -> Reject | None:
    for name in ("eps", "offset"):
        if name in m.binds and not m.is_constant(name):
            return Reject(f"{name} is not a compile-time constant")
    if m.shape("w")[-1:] != m.shape("x")[-1:] or len(m.shape("w")) != 1:
        return Reject(f"weight shape {list(m.shape('w'))} is not [D] for input "
                      f"{list(m.shape('x'))}")
    return None


def _add_check(m: Match) -> Reject | None:
    if m.shape("x") != m.shape("residual") or m.dtype("x") != m.dtype("residual"):
        return Reject(f"residual add broadcasts or promotes ({m.dtype('x')}"
                      f"{list(m.shape('x'))} + {m.dtype('residual')}"
                      f"{list(m.shape('residual'))})")
    return None


# --- replacements ---------------------------------------------------------------------------

def fused(x, w, eps: float):
    return ops.rms_norm(x, w, eps)


def fused_offset(x, w, eps: float, offset: float):
    return ops.rms_norm(x, w, eps, offset)


def fused_add(x, residual, w, eps: float, offset: float):
    return ops.add_rms_norm(x, residual, w, eps, offset)


def _half(dtype: torch.dtype) -> dict:
    return {name: torch.randn(*shape, dtype=dtype) for name, shape in _EXAMPLE.items()}


_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}

# the half-precision forms first: the float32 forms match inside them (between the casts)
RULES = RuleSet("norms", [
    *(Rule(f"rmsnorm_offset_{n}", rmsnorm_offset_upcast(dt), fused_offset, check=_norm_check,
           example=_half(dt)) for n, dt in _HALF.items()),
    Rule("rmsnorm_offset", rmsnorm_offset, fused_offset, check=_norm_check, example=_EXAMPLE),
    *(Rule(f"rmsnorm_{n}", rmsnorm_upcast(dt), fused, check=_norm_check, example=_half(dt))
      for n, dt in _HALF.items()),
    Rule("rmsnorm", rmsnorm, fused, check=_norm_check, example=_EXAMPLE),
    Rule("add_rmsnorm", add_rmsnorm, fused_add, check=_add_check,
         example={**_EXAMPLE, "residual": (2, 3, 8)}),
])
