"""Gated activations (the MLP of Llama-style models) become one fused op.

    silu(gate) * up                 ==>  llmcompile.silu_mul(gate, up)
    gelu(gate, approximate=a) * up  ==>  llmcompile.gelu_mul(gate, up, a)    (a: none, tanh)

Phi-3 computes gate and up with one ``gate_up_proj`` and ``chunk(2, -1)``: the chunks are the
bound ``gate`` and ``up``, so it fuses the same way. Only same-shape operands fuse: a GLU never
broadcasts, and the ONNX lowering relies on it.
"""

from __future__ import annotations

import torch.nn.functional as F

from llmcompile import ops
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_EXAMPLE = {"gate": (2, 3, 16), "up": (2, 3, 16)}


# --- patterns -------------------------------------------------------------------------------

def silu_mul(gate, up):
    return F.silu(gate) * up


def gelu_mul(approximate: str):
    def pattern(gate, up):
        return F.gelu(gate, approximate=approximate) * up
    return pattern


# --- check ----------------------------------------------------------------------------------

def same_shapes(m: Match) -> Reject | None:
    if m.shape("gate") != m.shape("up") or m.dtype("gate") != m.dtype("up"):
        return Reject(f"gate {m.dtype('gate')}{list(m.shape('gate'))} and up "
                      f"{m.dtype('up')}{list(m.shape('up'))} differ: not a GLU")
    return None


# --- replacements ---------------------------------------------------------------------------

def fused_silu(gate, up):
    return ops.silu_mul(gate, up)


def fused_gelu(approximate: str):
    def replacement(gate, up):
        return ops.gelu_mul(gate, up, approximate)
    return replacement


RULES = RuleSet("glu", [
    Rule("silu_mul", silu_mul, fused_silu, check=same_shapes, example=_EXAMPLE),
    *(Rule(name, gelu_mul(a), fused_gelu(a), check=same_shapes, example=_EXAMPLE)
      for name, a in (("gelu_mul", "none"), ("gelu_tanh_mul", "tanh"))),
])
