"""The rule engine: spellings, commutativity, scalars, declines, fixed point, metadata."""

import pytest
import torch

from llmcompile import Reject, Rule, RuleSet
from llmcompile.core.pattern import PatternError
from llmcompile.testing import assert_declines, check_rewrite, rewrite

aten = torch.ops.aten


def square_then_exp(x):
    return torch.exp(x.pow(2))


def fused_square_exp(x):
    return torch.exp(x * x)


SQUARE = RuleSet("t", [Rule("square", square_then_exp, fused_square_exp)])


@pytest.mark.parametrize("spelling", [
    lambda x: torch.exp(torch.pow(x, 2)),
    lambda x: torch.exp(x.pow(2)),
    lambda x: torch.exp(x ** 2),
    lambda x: (x ** 2).exp(),
])
def test_every_spelling_of_pow_matches(spelling):
    check_rewrite(SQUARE, spelling, fused_square_exp, (torch.randn(3, 5),), count=1)


def scaled_sum(x, y, scale: float):
    return (x + y) * scale


def scaled_sum_fused(x, y, scale: float):
    return torch.add(x, y, alpha=1) * scale + 0.0


SCALED = RuleSet("t", [Rule("scaled_sum", scaled_sum, lambda x, y, scale: torch.lerp(
    x * scale, y * scale, 0.5) * 2)])


@pytest.mark.parametrize("fn", [
    lambda a, b: (a + b) * 0.5,
    lambda a, b: 0.5 * (b + a),
    lambda a, b: (b + a) * 0.5,
])
def test_commutative_operands_match_without_copies(fn):
    inputs = (torch.randn(4, 8), torch.randn(4, 8))
    check_rewrite(SCALED, fn, None, inputs, count=1)


def test_scalar_wildcards_bind_each_constant():
    seen = []

    def record(m):
        seen.append(m["scale"])

    rules = RuleSet("t", [Rule("scaled_sum", scaled_sum,
                               lambda x, y, scale: x * scale + y * scale, check=record)])
    program, stats = rewrite(rules, lambda a, b: (a + b) * 3.0 + (a + b) * 0.25,
                             (torch.randn(2, 2), torch.randn(2, 2)))
    assert sorted(seen) == [0.25, 3.0]


def rms(x, w, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rms_fused(x, w, eps: float):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps)


def eps_constant(m):
    if not m.is_constant("eps"):
        return Reject("eps is not a compile-time constant")
    return None


RMS = RuleSet("t", [Rule("rms", rms, rms_fused, check=eps_constant,
                         example={"x": (2, 3, 8), "w": (8,)})])


def test_dims_are_canonical_across_ranks_and_spellings():
    def model(x, w):  # positive dim on a rank-3 tensor, weight on the left
        return w * (x * torch.rsqrt(torch.mean(x * 1 ** 2 * x, dim=2, keepdim=True) + 1e-5))

    def model2(x, w):
        return w * (x * torch.rsqrt(torch.mean(torch.pow(x, 2), dim=2, keepdim=True) + 1e-5))

    check_rewrite(RMS, model2, lambda x, w: rms_fused(x, w, 1e-5),
                  (torch.randn(2, 5, 16), torch.randn(16)), count=1)
    _, stats = rewrite(RMS, model, (torch.randn(2, 5, 16), torch.randn(16)))
    assert stats.fired("rms") == 0  # x*x is not x.pow(2): no silent semantic matching


def test_rule_declines_with_its_reason():
    def eps_is_tensor(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    inputs = (torch.randn(2, 5, 16), torch.randn(16), torch.tensor(1e-6))
    # eps here is a graph value: the scalar wildcard binds it, the check declines
    assert_declines(RMS, eps_is_tensor, inputs, rule="rms", reason="compile-time constant")


def test_escaping_intermediate_is_a_near_miss_not_a_wrong_rewrite():
    def model(x, w):
        r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x * r * w, r  # r is used outside the pattern

    assert_declines(RMS, model, (torch.randn(2, 5, 16), torch.randn(16)), rule="rms",
                    reason="also used outside the pattern")


def test_rewrites_reach_a_fixed_point_through_chains():
    rules = RuleSet("chain", [  # the second rule creates what the first one matches
        Rule("sigmoid", lambda x: torch.sigmoid(x), lambda x: 1 / (1 + torch.exp(-x))),
        Rule("tanh", lambda x: torch.tanh(x), lambda x: torch.sigmoid(2 * x) * 2 - 1),
    ])
    program, stats = rewrite(rules, lambda x: torch.tanh(x) + 1, (torch.randn(4),))
    assert stats.fired("tanh") == 1 and stats.fired("sigmoid") == 1
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert aten.tanh.default not in targets and aten.sigmoid.default not in targets
    check_rewrite(rules, lambda x: torch.tanh(x) + 1, None, (torch.randn(4),), count=2)


def test_a_rule_that_rematches_its_own_output_is_reported():
    loop = RuleSet("loop", [Rule("exp", lambda x: torch.exp(x), lambda x: torch.exp(x) * 1)])
    with pytest.raises(RuntimeError, match="fixed point"):
        rewrite(loop, lambda x: torch.exp(x), (torch.randn(4),))


def test_new_nodes_carry_metadata_and_graph_lints():
    program, stats = rewrite(RMS, lambda x, w: rms(x, w, 1e-6),
                             (torch.randn(2, 5, 16), torch.randn(16)))
    assert stats.fired("rms") == 1
    program.graph.lint()
    for node in program.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node
    new = [n for n in program.graph.nodes if n.meta.get("llmc_rule") == "rms"]
    assert new and all(n.target != aten.rsqrt.default for n in new)


def test_multi_output_pattern_and_weights():
    def two_linears(x, a, b):
        return torch.nn.functional.linear(x, a), torch.nn.functional.linear(x, b)

    def one_gemm(x, a, b):
        y = torch.nn.functional.linear(x, torch.cat([a, b]))
        return tuple(y.split([a.shape[0], b.shape[0]], dim=-1))

    def both_weights(m):
        if not (m.is_weight("a") and m.is_weight("b")):
            return Reject("projection weights are not model weights")
        return None

    rule = Rule("pair", two_linears, one_gemm, check=both_weights,
                example={"x": (2, 8), "a": (4, 8), "b": (4, 8)})
    inputs = (torch.randn(3, 8), torch.randn(5, 8), torch.randn(6, 8))
    check_rewrite(rule, lambda x, a, b: two_linears(x, a, b), None, inputs, count=1,
                  weights=[1, 2])
    assert_declines(rule, two_linears, inputs, rule="pair", reason="not model weights")


def test_pattern_errors_are_clear():
    with pytest.raises(PatternError, match="does not appear verbatim"):
        def arith(x, s: float):
            return x * (1.0 / s)
        _ = Rule("bad", arith, arith).pattern
    with pytest.raises(PatternError, match="could not be traced"):
        _ = Rule("bad", lambda x, w: torch.nn.functional.linear(x, w), lambda x, w: x).pattern


def test_wrong_replacement_is_caught_not_applied():
    bad = RuleSet("t", [Rule("shrink", lambda x: torch.exp(x), lambda x: torch.exp(x).sum(-1))])
    with pytest.raises(ValueError, match="is wrong"):
        rewrite(bad, lambda x: torch.exp(x), (torch.randn(3, 4),))


def test_check_rewrite_fails_on_wrong_expectation():
    with pytest.raises(AssertionError, match="differs from expected"):
        check_rewrite(SQUARE, square_then_exp, lambda x: torch.exp(x + x), (torch.randn(3),))
    with pytest.raises(AssertionError, match="expected 2 rewrites"):
        check_rewrite(SQUARE, square_then_exp, None, (torch.randn(3),), count=2)


def test_a_replacement_is_traced_once_for_matches_of_one_shape():
    traced = []

    def counted(x, w, eps: float):
        traced.append(tuple(x.shape))
        return rms_fused(x, w, eps)

    rules = RuleSet("t", [Rule("rms", rms, counted, check=eps_constant,
                               example={"x": (2, 3, 8), "w": (8,)})])

    def layers(x, w1, w2, w3):  # three norms; the last is over another shape
        h = rms(rms(x, w1, 1e-6) + x, w2, 1e-6)
        return rms(h[..., :8], w3, 1e-6)

    inputs = (torch.randn(2, 5, 16), torch.randn(16), torch.randn(16), torch.randn(8))
    program, stats = rewrite(rules, layers, inputs, weights=[1, 2, 3])
    assert stats.fired("rms") == 3 and len(traced) == 2, traced  # one trace per shape
    check_rewrite(rules, layers, None, inputs, count=3, weights=[1, 2, 3])
    traced.clear()
    rewrite(rules, lambda x, w: rms(x, w, 1e-6) + rms(x, w, 1e-5), inputs[:2], weights=[1])
    assert len(traced) == 2  # another eps is another replacement


def test_a_replacement_traced_on_one_value_twice_is_not_reused_for_two():
    rule = Rule("exp_sub", lambda a, b: torch.exp(a - b),
                lambda a, b: torch.exp(a) / torch.exp(b))
    check_rewrite(rule, lambda x, y: torch.exp(x - x) * torch.exp(y - x), None,
                  (torch.randn(4), torch.randn(4)), count=2)
