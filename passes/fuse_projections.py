"""Linear projections of one input become one GEMM on concatenated weights.

    linear(x, wq[, bq]), linear(x, wk[, bk]), linear(x, wv[, bv])
        ==>  linear(x, cat(wq, wk, wv)[, cat(bq, bk, bv)]).split([Nq, Nk, Nv], -1)
    linear(x, wg[, bg]), linear(x, wu[, bu])
        ==>  linear(x, cat(wg, wu)[, cat(bg, bu)]).split([Ng, Nu], -1)

Q/K/V projections (with biases in Qwen2) and gate/up projections read the same activation;
one GEMM reads it once. The weight ``cat`` is folded into a constant at compile time. The
three-way rules run first, so a Q/K/V triple becomes one GEMM rather than a pair plus one;
all rules are made by one factory, ``projections(n, bias)``. Only weights (not activations)
of one dtype concatenate; biases come with every projection or with none.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_NAMES = {3: ("qkv", ["wq", "wk", "wv"]), 2: ("gate_up", ["wg", "wu"])}


def _biases(weights: list[str]) -> list[str]:
    return ["b" + w[1:] for w in weights]


def _signature(fn, names: list[str]):
    P = inspect.Parameter
    fn.__signature__ = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in names])
    return fn


# --- pattern --------------------------------------------------------------------------------

def parallel_linears(weights: list[str], bias: bool):
    """``len(weights)`` linears of the same ``x`` (outputs in weight order)."""
    biases = _biases(weights) if bias else [None] * len(weights)

    def pattern(x, **p):
        return tuple(F.linear(x, p[w], p.get(b)) for w, b in zip(weights, biases))

    return _signature(pattern, ["x", *weights, *(biases if bias else [])])


# --- check ----------------------------------------------------------------------------------

def concatenable(weights: list[str], bias: bool):
    """All weights [N_i, K] of one dtype, biases [N_i]; returns the split sizes."""
    def check(m: Match):
        params = [*weights, *(_biases(weights) if bias else [])]
        for name in params:
            if not m.is_weight(name):
                return Reject(f"{name} is not a weight (bound to %{m[name].name})")
        dtypes = {m.dtype(name) for name in params}
        if len(dtypes) > 1:
            return Reject(f"projections mix dtypes {sorted(map(str, dtypes))}")
        shapes = [m.shape(w) for w in weights]
        if any(len(s) != 2 for s in shapes):
            return Reject(f"weights are not matrices: {[list(s) for s in shapes]}")
        sizes = [s[0] for s in shapes]
        if bias and [m.shape(b) for b in _biases(weights)] != [(n,) for n in sizes]:
            return Reject("bias shapes do not match the weights' output sizes")
        return {"sizes": sizes}
    return check


# --- replacement ----------------------------------------------------------------------------

def one_gemm(weights: list[str], bias: bool):
    biases = _biases(weights)

    def replacement(x, sizes, **p):
        w = torch.cat([p[n] for n in weights])  # [sum N_i, K], folded at compile time
        b = torch.cat([p[n] for n in biases]) if bias else None
        return tuple(F.linear(x, w, b).split(sizes, dim=-1))

    return _signature(replacement, ["x", *weights, *(biases if bias else []), "sizes"])


def projections(n: int, bias: bool) -> Rule:
    """The rule fusing ``n`` projections of one input, with or without biases."""
    prefix, weights = _NAMES[n]
    example = {"x": (2, 3, 8), **{w: (4 + i, 8) for i, w in enumerate(weights)},
               **{b: (4 + i,) for i, b in enumerate(_biases(weights))}}
    if not bias:
        example = {k: v for k, v in example.items() if not k.startswith("b")}
    return Rule(f"{prefix}_projection{'_bias' if bias else ''}",
                parallel_linears(weights, bias), one_gemm(weights, bias),
                check=concatenable(weights, bias), example=example)


RULES = RuleSet("projections", [projections(n, bias) for n in (3, 2) for bias in (False, True)])
