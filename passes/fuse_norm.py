"""RMSNorm:  x * rsqrt(mean(x², -1) + eps) * w  ==>  llmcompile.rms_norm(x, w, eps)"""

from __future__ import annotations

import torch

from llmcompile import ops
from llmcompile.rules import Match, Reject, Rule, RuleSet


def rmsnorm(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def eps_is_constant(m: Match) -> Reject | None:
    if not m.is_constant("eps"):
        return Reject("eps is not a compile-time constant")
    if m.shape("w")[-1:] != m.shape("x")[-1:] or len(m.shape("w")) != 1:
        return Reject(f"weight shape {list(m.shape('w'))} is not [D] for input "
                      f"{list(m.shape('x'))}")
    return None


def fused(x, w, eps: float):
    return ops.rms_norm(x, w, eps)


RULES = RuleSet("norms", [
    Rule("rmsnorm", rmsnorm, fused, check=eps_is_constant, example={"x": (2, 3, 8), "w": (8,)}),
])
