"""Causal attention over a KV cache becomes one cached-attention op (ONNX Runtime lowering).

    k' = cat(pk, k); v' = cat(pv, v)
    attention(q, k', v', None, c, causal=True, window=w), k', v'
        ==>  group_query_attention(q, k, v, pk, pv, c, w)            (out, present k', v')
    attention(q, k, v, None, c, causal=True, window=w)               query length == key length
        ==>  group_query_attention(q, k, v, None, None, c, w)[0]
    attention(q, k, v, mask, c)     mask built from sizes alone and causal (window w), S == T
        ==>  group_query_attention(q, k, v, None, None, c, w)[0]

When the queries, keys and values are heads of one packed projection (``split`` of a fused
Q/K/V linear) and the queries and keys are rotated by a rotary embedding computed from the
position ids alone, the rotary moves into the attention too:

    q, k, v = heads(split(qkv)); gqa(rotary(q, c, s), rotary(k, c, s), v, pk, pv, ...)
        ==>  packed_attention(qkv, pk, pv, cos_table, sin_table, positions, ...)

(``GroupQueryAttention`` with ``do_rotary``: one op after the projection's ``MatMulNBits``).
The cos / sin tables ``[P, E/2]`` are the model's own rotary evaluated at positions
``0..P-1`` (``P``: the program's ``max_positions``, set by ``llmcompile.export``), checked to be
a function of the position alone.

``group_query_attention`` is translated to ONNX Runtime's ``GroupQueryAttention``, which takes
the new keys and the cache separately and appends them itself, so the cache concatenation is
part of the match. Attention with an explicit mask (padding), attention sinks, or a
non-causal mask stays ``llmcompile.attention`` and is exported as standard ONNX ops. Whether a
mask tensor is causal is decided by :func:`llmcompile.analysis.masks.causal_window`.
Shapes: ``q [B, Hq, S, E]``, ``k/v [B, Hkv, S, E]``, ``pk/pv [B, Hkv, P, E]``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from llmcompile import ops
from llmcompile._compat import same_shape
from llmcompile.analysis.masks import causal_window
from llmcompile.core.fold import evaluate
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


def rotary_cached_attention(q, k, v, cos, sin, past_k, past_v, scale: float, window: int):
    out, keys, values = ops.group_query_attention(ops.rotary(q, cos, sin), ops.rotary(k, cos, sin),
                                                  v, past_k, past_v, scale, window)
    return out, keys, values


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


_aten = torch.ops.aten
_VIEWS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}


def _head_of_split(node) -> tuple[fx.Node, int] | None:
    """``(split, i)`` when ``node [B, H, S, E]`` is ``split(qkv, sizes, -1)[i].view(B, S, H,
    E).transpose(1, 2)``."""
    if not isinstance(node, fx.Node) or node.target is not _aten.transpose.int:
        return None
    if sorted(d % 4 for d in node.args[1:3]) != [1, 2]:
        return None
    view = node.args[0]
    if not isinstance(view, fx.Node) or view.target not in _VIEWS:
        return None
    item = view.args[0]
    if not isinstance(item, fx.Node) or item.target is not operator.getitem:
        return None
    split, index = item.args
    if getattr(split, "target", None) is not _aten.split_with_sizes.default:
        return None
    source = split.args[0].meta.get("val")
    dim = split.args[2] if len(split.args) > 2 else 0
    if source is None or source.dim() != 3 or dim % 3 != 2:
        return None
    return split, index


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _evaluate(program, nodes: set[fx.Node], out: fx.Node, feed: dict) -> torch.Tensor:
    """``out`` computed from ``feed`` and the weights (``nodes``: its ancestors)."""
    return evaluate(program, [n for n in program.graph.nodes if n in nodes], dict(feed))[out]


def rotary_tables(program, cos: fx.Node, sin: fx.Node, head_dim: int, dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, fx.Node] | str:
    """``(cos_table, sin_table [P, E/2], positions)`` of a rotary computed from one integer
    input alone (the position ids), or why not. Cached per program: the layers share it."""
    tables = program.context.setdefault("_rotary_tables", {})
    key = (cos.name, sin.name)
    if key not in tables:
        found = _rotary_tables(program, cos, sin, head_dim, dtype)
        if not isinstance(found, str):  # each layer's view of the one rotary: one table
            found = next((t for t in tables.values() if not isinstance(t, str)
                          and t[2] is found[2] and all(torch.equal(a, b) for a, b
                                                       in zip(t[:2], found[:2]))), found)
        tables[key] = found
    return tables[key]


def _rotary_tables(program, cos, sin, head_dim, dtype):
    limit = program.context.get("max_positions")
    if not limit:
        return "no maximum position is known (set by llmcompile.export)"
    nodes = _ancestors(cos) | _ancestors(sin)
    inputs = [n for n in nodes if n.op == "placeholder" and not program.is_weight(n)]
    val = inputs[0].meta.get("val") if len(inputs) == 1 else None
    if val is None or val.dim() != 2 or val.dtype.is_floating_point:
        return "the rotary is not computed from the position ids alone"
    half = head_dim // 2
    try:
        with torch.no_grad():
            table = [_evaluate(program, nodes, n, {inputs[0]: torch.arange(limit)[None]})
                     for n in (cos, sin)]
            table = [t.reshape(limit, head_dim) for t in table]
            probe = torch.tensor([[3, 1, limit - 1], [0, 5, 2]])
            again = [_evaluate(program, nodes, n, {inputs[0]: probe}).reshape(2, 3, head_dim)
                     for n in (cos, sin)]
    except Exception as e:  # noqa: BLE001 - any failure means "cannot tabulate"
        return f"the rotary could not be tabulated ({type(e).__name__}: {e})"
    for t, t2 in zip(table, again):
        if not torch.equal(t[:, :half], t[:, half:]):
            return "the rotary's cos / sin halves differ (not the rotate-half form)"
        if not torch.allclose(t[probe], t2, atol=1e-6, rtol=1e-5):
            return "the rotary is not a function of each position alone"
    return table[0][:, :half].to(dtype), table[1][:, :half].to(dtype), inputs[0]


def check_packed(m: Match) -> Reject | dict:
    heads = [_head_of_split(m[n]) for n in ("q", "k", "v")]
    if any(h is None for h in heads) or len({h[0] for h in heads}) != 1:
        return Reject("queries, keys and values are not heads of one packed projection")
    if [h[1] for h in heads] != [0, 1, 2]:
        return Reject("the packed projection is not ordered queries, keys, values")
    split = heads[0][0]
    hq, hkv, e = m.shape("q")[1], m.shape("k")[1], m.shape("q")[-1]
    if not all(isinstance(d, int) for d in (hq, hkv, e)) or hq % hkv or e % 2:
        return Reject("head counts or head size are not static")
    if list(split.args[1]) != [hq * e, hkv * e, hkv * e]:
        return Reject("the packed projection has other parts than Q, K and V")
    tables = rotary_tables(m.program, m["cos"], m["sin"], e, m.dtype("q"))
    if isinstance(tables, str):
        return Reject(tables)
    cos_table, sin_table, positions = tables
    if not same_shape(m.shape("q")[2:3], positions.meta["val"].shape[1:2]):
        return Reject("the position ids and the queries differ in length")
    # the first input of the same (symbolic) past length: every layer reads its size
    length = m.shape("past_k")[2:3]
    past_like = next((n for n in m.program.graph.nodes if n.op == "placeholder"
                      and isinstance(n.meta.get("val"), torch.Tensor)
                      and n.meta["val"].dim() == 4
                      and same_shape(n.meta["val"].shape[2:3], length)), m["past_k"])
    return {"qkv": split.args[0], "cos_table": cos_table, "sin_table": sin_table,
            "positions": positions, "heads": hq, "kv_heads": hkv, "past_like": past_like}


# --- replacements ---------------------------------------------------------------------------

def fused_packed(q, k, v, cos, sin, past_k, past_v, scale: float, window: int, qkv, cos_table,
                 sin_table, positions, heads: int, kv_heads: int, past_like=None):
    return ops.packed_attention(qkv, past_k, past_v, cos_table, sin_table, positions, heads,
                                kv_heads, scale, window, past_like)


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
    Rule("packed_rotary_attention", rotary_cached_attention, fused_packed, check=check_packed,
         example={**_EXAMPLE, "cos": (2, 1, 3, 8), "sin": (2, 1, 3, 8)}),
])
