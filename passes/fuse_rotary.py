"""Rotary position embedding (the rotate-half form) becomes one ``llmcompile.rotary`` op.

    x * cos + cat(-x[..., h:], x[..., :h]) * sin    ==>  llmcompile.rotary(x, cos, sin)
                                                           (when 2h = E, the head dim)

This is ``apply_rotary_pos_emb`` of Llama, Qwen2, Mistral, Gemma and Phi-3 (Phi-3 applies it
to ``x[..., :rotary_dim]``; the slice is the bound ``x``). ``cos``/``sin`` are whatever the
model broadcasts (``[B, 1, S, E]``): the op computes exactly the same expression.

GPT-J rotates *interleaved* pairs (``rotate_every_two``: (2i, 2i+1)), not halves (i, i + E/2):
a different function of ``x``, so ``rotary_interleaved`` matches it only to decline, with a
reason (fusing it would need the q/k projection rows permuted).
"""

from __future__ import annotations

import torch

from llmcompile import ops
from llmcompile._compat import same_shape
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

aten = torch.ops.aten
_END = 2**63 - 1  # what `x[..., h:]` traces to
_EXAMPLE = {"x": (2, 4, 5, 8), "cos": (2, 1, 5, 8), "sin": (2, 1, 5, 8)}


# --- patterns -------------------------------------------------------------------------------

def rotary(x, cos, sin, half: int):
    # rotate_half(x) = cat(-x[..., half:], x[..., :half]), spelled as the slices it traces to:
    # indexing drops a slice it sees covers the whole (example) tensor
    x1, x2 = aten.slice(x, -1, 0, half), aten.slice(x, -1, half, _END)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def rotary_interleaved(x, cos, sin):
    rotated = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)  # rotate_every_two
    return x * cos + rotated * sin


# --- checks ---------------------------------------------------------------------------------

def halves(m: Match) -> Reject | None:
    if not m.is_constant("half"):
        return Reject("the rotate_half split point is not a compile-time constant")
    head_dim = m.shape("x")[-1]
    if not same_shape([2 * m["half"]], [head_dim]):
        return Reject(f"rotate_half splits at {m['half']}, not at the middle of {head_dim}")
    return None


def interleaved(m: Match) -> Reject:
    return Reject("interleaved rotary (rotate_every_two, GPT-J) pairs (2i, 2i+1); "
                  "llmcompile.rotary pairs (i, i + E/2)")


# --- replacement ----------------------------------------------------------------------------

def fused(x, cos, sin):
    return ops.rotary(x, cos, sin)


RULES = RuleSet("rotary", [
    Rule("rotary", rotary, fused, check=halves, example=_EXAMPLE),
    Rule("rotary_interleaved", rotary_interleaved, fused, check=interleaved, example=_EXAMPLE),
])
