"""Causal attention over a KV cache becomes one cached-attention op (ONNX Runtime lowering).

    k' = cat(pk, k); v' = cat(pv, v)
    attention(q, k', v', None, c, causal=True, window=w), k', v'
        ==>  group_query_attention(q, k, v, pk, pv, c, w)            (out, present k', v')
    attention(q, k, v, None, c, causal=True, window=w)               query length == key length
        ==>  group_query_attention(q, k, v, None, None, c, w)[0]
    attention(q, k, v, mask, c)     mask built from sizes alone and causal (window w), S == T
        ==>  group_query_attention(q, k, v, None, None, c, w)[0]

``group_query_attention`` is translated to ONNX Runtime's ``GroupQueryAttention``, which takes
the new keys and the cache separately and appends them itself, so the cache concatenation is
part of the match. Attention with an explicit mask (padding), attention sinks, or a
non-causal mask stays ``llmcompile.attention`` and is exported as standard ONNX ops. Whether a
mask tensor is causal is decided by :func:`llmcompile.analysis.masks.causal_window`.
Shapes: ``q [B, Hq, S, E]``, ``k/v [B, Hkv, S, E]``, ``pk/pv [B, Hkv, P, E]``.
"""

from __future__ import annotations

import torch

from llmcompile import ops
from llmcompile._compat import same_shape
from llmcompile.analysis.masks import causal_window
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_EXAMPLE = {"q": (2, 4, 3, 8), "k": (2, 2, 3, 8), "v": (2, 2, 3, 8), "past_k": (2, 2, 5, 8),
            "past_v": (2, 2, 5, 8)}


# --- patterns -------------------------------------------------------------------------------

def cached_attention(q, past_k, k, past_v, v, scale: float, window: int):
    keys, values = torch.cat([past_k, k], dim=-2), torch.cat([past_v, v], dim=-2)
    return ops.attention(q, keys, values, None, scale, True, window), keys, values


def prompt_attention(q, k, v, scale: float, window: int):
    return ops.attention(q, k, v, None, scale, True, window)


def masked_attention(q, k, v, mask, scale: float):
    return ops.attention(q, k, v, mask, scale)


# --- checks ---------------------------------------------------------------------------------

def _heads(m: Match) -> str | None:
    hq, hkv = m.shape("q")[1], m.shape("k")[1]
    if not isinstance(hq, int) or not isinstance(hkv, int) or hq % hkv:
        return f"{hq} query heads are not a multiple of {hkv} key/value heads"
    if m.dtype("q") != m.dtype("k") or m.shape("q")[-1] != m.shape("k")[-1]:
        return "query and key differ in dtype or head size"
    return None


def check_cached(m: Match) -> Reject | None:
    problem = _heads(m)
    if not problem and not same_shape(m.shape("q")[2:3], m.shape("k")[2:3]):
        problem = "new keys and queries differ in length"
    return Reject(problem) if problem else None


def check_prompt(m: Match) -> Reject | None:
    problem = _heads(m)
    if not problem and not same_shape(m.shape("q")[2:3], m.shape("k")[2:3]):
        problem = ("query length differs from key length and no cache concatenation was "
                   "found: the keys' past is unknown")
    return Reject(problem) if problem else None


def check_masked(m: Match) -> Reject | dict:
    reject = check_prompt(m)
    if reject is not None:
        return reject
    window = causal_window(m["mask"])
    return Reject(window) if isinstance(window, str) else {"window": window}


# --- replacements ---------------------------------------------------------------------------

def fused_cached(q, past_k, k, past_v, v, scale: float, window: int):
    return ops.group_query_attention(q, k, v, past_k, past_v, scale, window)


def fused_prompt(q, k, v, scale: float, window: int):
    return ops.group_query_attention(q, k, v, None, None, scale, window)[0]


def fused_masked(q, k, v, mask, scale: float, window: int = 0):
    return ops.group_query_attention(q, k, v, None, None, scale, window)[0]


RULES = RuleSet("onnx_attention", [
    Rule("cached_attention", cached_attention, fused_cached, check=check_cached,
         example=_EXAMPLE),
    Rule("prompt_attention", prompt_attention, fused_prompt, check=check_prompt,
         example={n: _EXAMPLE[n] for n in "qkv"}),
    Rule("masked_attention", masked_attention, fused_masked, check=check_masked,
         example={**{n: _EXAMPLE[n] for n in "qkv"}, "mask": (2, 1, 3, 3)}),
])
