"""Attention, hand-written or SDPA, becomes one ``llmcompile.attention`` op.

    softmax(q @ kᵀ * c + mask, -1) @ v        ==>  llmcompile.attention(q, k, v, mask, c)
    softmax(q @ kᵀ / c + mask, -1) @ v        ==>  llmcompile.attention(q, k, v, mask, 1 / c)
    softmax(q @ kᵀ + mask, -1) @ v            ==>  llmcompile.attention(q, k, v, mask, 1.0)
    sdpa(q, k, v, mask, scale=c)              ==>  llmcompile.attention(q, k, v, mask, c)
    sdpa(q, k, v, is_causal=True, scale=c)    ==>  llmcompile.attention(q, k, v, None, c,
                                                                       causal=True)

    llmcompile.attention(q, repeat_kv(k), repeat_kv(v), ...)
                                              ==>  llmcompile.attention(q, k, v, ...)

The last rule removes the copies of K and V that eager grouped-query attention makes
(``k[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv * n, T, D)``, transformers'
``repeat_kv``, used whenever a mask is given): ``llmcompile.attention`` takes fewer K/V heads
than query heads itself, and its CPU decomposition never copies the cache per query head.

Each hand-written form also comes without ``+ mask`` (GPT-2 and GPT-J eager spell the first
two, with an additive float mask; dropout is gone in inference). Rewriting SDPA too gives later
passes one op whose mask *description* they may change (sparse attention).

Scores transformed between the scaling and the softmax (logit soft-capping
``tanh(s / c) * c``, ALiBi written as a second add, ...) do not match: SDPA cannot express them.
Shapes: ``q [B, Hq, S, E]``, ``k [B, Hkv, T, E]``, ``v [B, Hkv, T, Ev]``, mask broadcasting to
``[B, Hq, S, T]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmcompile import ops
from llmcompile._compat import same_shape
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_EXAMPLE = {"q": (2, 4, 5, 8), "k": (2, 4, 6, 8), "v": (2, 4, 6, 8), "mask": (2, 1, 5, 6)}


def _signature(body: Callable, tensors: list[str], scalars: list[str]) -> Callable:
    """``body`` as a function of the named tensor and ``float`` parameters (for variants)."""
    def fn(**kwargs):
        return body(**kwargs)

    P = inspect.Parameter
    fn.__signature__ = inspect.Signature(
        [P(n, P.POSITIONAL_OR_KEYWORD) for n in tensors]
        + [P(n, P.POSITIONAL_OR_KEYWORD, annotation=float) for n in scalars])
    fn.__name__, fn.__doc__ = body.__name__, body.__doc__
    return fn


# --- patterns -------------------------------------------------------------------------------

def manual_attention(scaling: str, masked: bool):
    """softmax(q @ kᵀ (* or /) c [+ mask]) @ v, as eager attention spells it."""
    def attention(q, k, v, mask=None, c=None):
        s = torch.matmul(q, k.transpose(-2, -1))  # [B, H, S, T]
        s = s * c if scaling == "mul" else s / c if scaling == "div" else s
        if masked:
            s = s + mask
        return torch.matmul(F.softmax(s, dim=-1), v)  # [B, H, S, Ev]

    names = ["q", "k", "v", *(["mask"] if masked else [])]
    return _signature(attention, names, ["c"] if scaling != "none" else [])


def sdpa(masked: bool, causal: bool, gqa: bool):
    """scaled_dot_product_attention without dropout; ``c`` is its ``scale`` (None: default)."""
    def attention(q, k, v, mask=None, c=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                              is_causal=causal, scale=c, enable_gqa=gqa)

    return _signature(attention, ["q", "k", "v", *(["mask"] if masked else [])], ["c"])


# --- check ----------------------------------------------------------------------------------

def _dims_agree(m: Match) -> str | None:
    q, k, v = m.shape("q"), m.shape("k"), m.shape("v")
    if not len(q) == len(k) == len(v) == 4:
        return f"q, k, v are not [B, H, S, E] (ranks {len(q)}, {len(k)}, {len(v)})"
    if not same_shape([q[0], k[0], k[1], k[2]], [k[0], v[0], v[1], v[2]]):
        return f"k {list(k)} and v {list(v)} (and q {list(q)}) disagree on batch, heads or length"
    if not same_shape([q[-1]], [k[-1]]):
        return f"q and k head dims differ ({q[-1]} vs {k[-1]})"
    if not same_shape([q[1] % k[1]], [0]):
        return f"{q[1]} query heads are not a multiple of {k[1]} key/value heads"
    dtypes = {m.dtype("q"), m.dtype("k"), m.dtype("v")}
    if len(dtypes) > 1:
        return f"q, k, v dtypes differ ({sorted(map(str, dtypes))})"
    return None


def _mask_ok(m: Match, additive: bool) -> str | None:
    if "mask" not in m.binds:
        return None
    q, mask = m.shape("q"), m.shape("mask")
    scores = [q[0], q[1], q[2], m.shape("k")[2]]  # [B, Hq, S, T]
    if len(mask) > 4 or not all(d == 1 or same_shape([d], [s])
                                for d, s in zip(reversed(mask), reversed(scores))):
        return f"mask {list(mask)} does not broadcast to the scores {scores}"
    if additive and not m.dtype("mask").is_floating_point:
        return f"a {m.dtype('mask')} mask added to the scores is not a keep-mask"
    if additive and m.dtype("mask") != m.dtype("q"):
        return f"mask dtype {m.dtype('mask')} promotes the {m.dtype('q')} scores"
    return None


def _scale(m: Match, how: str) -> dict | Reject:
    """The scale as one constant: c, 1 / c, 1, or SDPA's default 1 / sqrt(E)."""
    if how == "none":
        return {"scale": 1.0}
    if not m.is_constant("c"):
        return Reject(f"the attention scale %{m['c'].name} is not a compile-time constant")
    c, head_dim = m["c"], m.shape("q")[-1]
    if c is None and not isinstance(head_dim, int):
        return Reject(f"SDPA's default scale needs a static head dim, not {head_dim}")
    if c is None:
        return {"scale": head_dim ** -0.5}
    return {"scale": 1.0 / c if how == "div" else float(c)}


def check_attention(how: str, causal: bool = False):
    """Shapes SDPA accepts, an additive float mask (hand-written form), a constant scale."""
    def check(m: Match):
        problem = _dims_agree(m) or _mask_ok(m, additive=how != "sdpa")
        if causal and not problem and not same_shape([m.shape("q")[2]], [m.shape("k")[2]]):
            problem = ("is_causal with query length != key length: SDPA aligns the diagonal "
                       "top-left, llmcompile.attention bottom-right")
        return Reject(problem) if problem else _scale(m, how)
    return check


# --- replacement ----------------------------------------------------------------------------

def fused(masked: bool, causal: bool = False):
    def attention(q, k, v, mask=None, scale=1.0):
        return ops.attention(q, k, v, mask, scale, causal)

    names = ["q", "k", "v", *(["mask"] if masked else [])]
    return _signature(attention, names, ["scale"])


def _manual_rule(scaling: str, masked: bool) -> Rule:
    name = f"attention_{scaling}{'_masked' if masked else ''}"
    return Rule(name, manual_attention(scaling, masked), fused(masked),
                check=check_attention(scaling),
                example=_EXAMPLE if masked else {n: _EXAMPLE[n] for n in "qkv"})


def _sdpa_rule(masked: bool, causal: bool, gqa: bool) -> Rule:
    name = "sdpa" + ("_masked" if masked else "") + ("_causal" if causal else "") + (
        "_gqa" if gqa else "")
    example = dict(_EXAMPLE, k=(2, 2, 6, 8), v=(2, 2, 6, 8)) if gqa else dict(_EXAMPLE)
    if causal:
        example.update(k=example["k"][:2] + (5, 8), v=example["v"][:2] + (5, 8))
    if not masked:
        example.pop("mask")
    return Rule(name, sdpa(masked, causal, gqa), fused(masked, causal),
                check=check_attention("sdpa", causal), example=example)


# --- grouped-query attention: drop repeat_kv -------------------------------------------------

_VIEWS = {torch.ops.aten.reshape.default, torch.ops.aten.view.default,
          torch.ops.aten._unsafe_view.default}


def _unrepeated(node) -> tuple | None:
    """(x, n) when ``node`` is ``x[:, :, None].expand(B, H, n, T, D).reshape(B, H * n, T, D)``."""
    expand = node.args[0] if getattr(node, "target", None) in _VIEWS else None
    if getattr(expand, "target", None) is not torch.ops.aten.expand.default:
        return None
    unsqueeze = expand.args[0]
    if (getattr(unsqueeze, "target", None) is not torch.ops.aten.unsqueeze.default
            or unsqueeze.args[1] not in (2, -3)):
        return None
    x = unsqueeze.args[0]
    xs, es, ns = (tuple(n.meta["val"].shape) for n in (x, expand, node))
    if not (len(xs) == 4 and len(es) == 5 and len(ns) == 4
            and same_shape([*es[:2], *es[3:]], list(xs))
            and same_shape(list(ns), [xs[0], xs[1] * es[2], xs[2], xs[3]])):
        return None
    return x, es[2]


def check_repeated_kv(m: Match):
    k, v = _unrepeated(m["k"]), _unrepeated(m["v"])
    if k is None or v is None:
        return Reject("k and v are not both repeat_kv copies (x[:, :, None].expand.reshape)")
    if not same_shape([k[1]], [v[1]]):
        return Reject(f"k and v are repeated {k[1]} and {v[1]} times")
    return {"k": k[0], "v": v[0]}


def _unrepeat_rule(masked: bool, causal: bool) -> Rule:
    name = "attention_unrepeat_kv" + ("_masked" if masked else "") + ("_causal" if causal else "")
    example = {n: _EXAMPLE[n] for n in ("qkv" if not masked else ("q", "k", "v", "mask"))}
    return Rule(name, fused(masked, causal), fused(masked, causal), check=check_repeated_kv,
                example=example)


RULES = RuleSet("attention", [
    *(_manual_rule(s, masked) for s in ("mul", "div", "none") for masked in (True, False)),
    *(_sdpa_rule(masked, causal, gqa) for masked, causal in ((True, False), (False, True),
                                                           (False, False))
      for gqa in (False, True)),
    *(_unrepeat_rule(masked, causal) for masked, causal in ((True, False), (False, True),
                                                          (False, False))),
])
