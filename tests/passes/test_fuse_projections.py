import torch
import torch.nn.functional as F

from llmcompile.passes.fuse_projections import RULES
from llmcompile.testing import assert_declines, check_rewrite

D = 32


def weights(*rows, bias=False):
    torch.manual_seed(0)
    ws = [torch.randn(n, D) for n in rows]
    return (*ws, *(torch.randn(n) for n in rows)) if bias else tuple(ws)


def rows(*ws):  # test graphs have symbolic sizes: split at the weights' sizes
    return [w.shape[0] for w in ws]


def x():
    return torch.randn(2, 5, D)


def test_qkv_one_gemm():
    def before(x, wq, wk, wv):
        return F.linear(x, wq) * 2, F.linear(x, wk), F.linear(x, wv)

    def expected(x, wq, wk, wv):
        q, k, v = F.linear(x, torch.cat([wq, wk, wv])).split(rows(wq, wk, wv), dim=-1)
        return q * 2, k, v

    check_rewrite(RULES, before, expected, (x(), *weights(32, 16, 16)), weights=[1, 2, 3],
                  count={"qkv_projection": 1, "gate_up_projection": 0})


def test_qkv_with_bias_qwen2():
    def before(x, wq, wk, wv, bq, bk, bv):
        return F.linear(x, wq, bq), F.linear(x, wk, bk), F.linear(x, wv, bv)

    def expected(x, wq, wk, wv, bq, bk, bv):
        w, b = torch.cat([wq, wk, wv]), torch.cat([bq, bk, bv])
        return tuple(F.linear(x, w, b).split(rows(wq, wk, wv), dim=-1))

    check_rewrite(RULES, before, expected, (x(), *weights(32, 16, 16, bias=True)),
                  weights=range(1, 7), count={"qkv_projection_bias": 1})


def test_gate_up_one_gemm():
    def before(x, wg, wu):
        return F.silu(F.linear(x, wg)) * F.linear(x, wu)

    def expected(x, wg, wu):
        gate, up = F.linear(x, torch.cat([wg, wu])).split(rows(wg, wu), dim=-1)
        return F.silu(gate) * up

    check_rewrite(RULES, before, expected, (x(), *weights(64, 64)), weights=[1, 2],
                  count={"gate_up_projection": 1, "qkv_projection": 0})


def test_declines_activation_weights():
    def before(x, wg, wu):
        return F.linear(x, wg), F.linear(x, wu)

    assert_declines(RULES, before, (x(), *weights(64, 64)), weights=[1], rule="gate_up_projection",
                    reason="wu is not a weight")


def test_declines_vector_weights():
    def before(x, wg, wu):
        return F.linear(x, wg), F.linear(x, wu)  # [B, S] each: dot products, not projections

    wg, wu = torch.randn(D), torch.randn(D)
    assert_declines(RULES, before, (x(), wg, wu), weights=[1, 2], rule="gate_up_projection",
                    reason="not matrices")
