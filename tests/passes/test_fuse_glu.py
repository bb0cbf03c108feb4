import pytest
import torch
import torch.nn.functional as F

from llmcompile import ops
from llmcompile.passes.fuse_glu import RULES
from llmcompile.testing import assert_declines, check_rewrite


def inputs(up_shape=(2, 5, 32)):
    torch.manual_seed(0)
    return torch.randn(2, 5, 32), torch.randn(*up_shape)


def test_silu_mul():
    def expected(gate, up):
        return ops.silu_mul(gate, up)

    check_rewrite(RULES, lambda gate, up: F.silu(gate) * up, expected, inputs(),
                  count={"silu_mul": 1})


def test_silu_mul_phi3_chunked():
    def before(gate_up):  # Phi3MLP: one projection, chunked; `up * act(gate)`
        gate, up = gate_up.chunk(2, dim=-1)
        return up * F.silu(gate)

    def expected(gate_up):
        gate, up = gate_up.chunk(2, dim=-1)
        return ops.silu_mul(gate, up)

    check_rewrite(RULES, before, expected, (torch.randn(2, 5, 64),), count={"silu_mul": 1})


@pytest.mark.parametrize(("approximate", "rule"), [("none", "gelu_mul"),
                                                   ("tanh", "gelu_tanh_mul")])
def test_gelu_mul(approximate, rule):
    def before(gate, up):
        return F.gelu(gate, approximate=approximate) * up

    def expected(gate, up):
        return ops.gelu_mul(gate, up, approximate)

    check_rewrite(RULES, before, expected, inputs(), count={rule: 1})


def test_silu_mul_declines_broadcast():
    assert_declines(RULES, lambda gate, up: F.silu(gate) * up, inputs((32,)), rule="silu_mul",
                    reason="not a GLU")


def test_silu_mul_declines_when_silu_is_reused():
    def before(gate, up):
        act = F.silu(gate)
        return act * up, act

    assert_declines(RULES, before, inputs(), rule="silu_mul", reason="also used outside")
