import torch

from llmcompile import ops
from llmcompile.passes.fuse_norm import RULES
from llmcompile.testing import assert_declines, check_rewrite

EPS = 1e-6


def llama_norm(x, w):
    # LlamaRMSNorm.forward in float32: the casts are identities
    variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(variance + EPS))


def gemma_norm(x, w):
    # GemmaRMSNorm.forward: _norm(x.float()) * (1.0 + w.float()), cast back
    xf = x.float()
    out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
    return (out * (1.0 + w.float())).type_as(x)


def inputs(*shapes):
    torch.manual_seed(0)
    return tuple(torch.randn(*s) for s in shapes)


def test_rmsnorm_llama_spelling():
    def expected(x, w):
        return ops.rms_norm(x, w, EPS)

    check_rewrite(RULES, llama_norm, expected, inputs((2, 5, 64), (64,)),
                  count={"rmsnorm": 1, "rmsnorm_offset": 0})


def test_rmsnorm_gemma_offset():
    def expected(x, w):
        return ops.rms_norm(x, w, EPS, 1.0)

    check_rewrite(RULES, gemma_norm, expected, inputs((2, 5, 64), (64,)),
                  count={"rmsnorm_offset": 1, "rmsnorm": 0})


def test_rmsnorm_declines_non_vector_weight():
    def before(x, w):
        return llama_norm(x, w)

    assert_declines(RULES, before, inputs((2, 5, 64), (5, 64)), rule="rmsnorm",
                    reason="is not [D]")


def test_rmsnorm_declines_runtime_eps():
    def before(x, w, eps):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    assert_declines(RULES, before, (*inputs((2, 5, 64), (64,)), torch.tensor(1e-5)),
                    rule="rmsnorm", reason="eps is not a compile-time constant")


def test_add_rmsnorm_two_outputs():
    def before(x, r, w):
        s = x + r
        return llama_norm(s, w), s * 2

    def expected(x, r, w):
        normed, s = ops.add_rms_norm(x, r, w, EPS, 0.0)
        return normed, s * 2

    check_rewrite(RULES, before, expected, inputs((2, 5, 64), (2, 5, 64), (64,)),
                  count={"rmsnorm": 1, "add_rmsnorm": 1})


def test_add_rmsnorm_gemma():
    def before(x, r, w):
        return gemma_norm(r + x, w)

    def expected(x, r, w):
        return ops.add_rms_norm(r, x, w, EPS, 1.0)[0]

    check_rewrite(RULES, before, expected, inputs((2, 5, 64), (2, 5, 64), (64,)),
                  count={"rmsnorm_offset": 1, "add_rmsnorm": 1})


def test_add_rmsnorm_declines_broadcasting_add():
    def before(x, r, w):
        return llama_norm(x + r, w)

    assert_declines(RULES, before, inputs((2, 5, 64), (64,), (64,)), rule="add_rmsnorm",
                    reason="broadcasts")


def llama_norm_half(x, w):
    # LlamaRMSNorm.forward on a bfloat16 input: float32 statistics, cast back, then scale
    xf = x.to(torch.float32)
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)


def test_rmsnorm_bf16_llama_spelling():
    def expected(x, w):
        return ops.rms_norm(x, w, EPS)

    x, w = (t.bfloat16() for t in inputs((2, 5, 64), (64,)))
    # the fused op scales in float32 and rounds once; Llama rounds before scaling too
    check_rewrite(RULES, llama_norm_half, expected, (x, w), count={"rmsnorm_bf16": 1},
                  rtol=1.6e-2, atol=1.6e-2)


def test_rmsnorm_bf16_gemma_spelling():
    def expected(x, w):
        return ops.rms_norm(x, w, EPS, 1.0)

    x, w = (t.bfloat16() for t in inputs((2, 5, 64), (64,)))
    check_rewrite(RULES, gemma_norm, expected, (x, w),
                  count={"rmsnorm_offset_bf16": 1, "rmsnorm_offset": 0})


def test_rmsnorm_fp16_declines_runtime_eps():
    def before(x, w, eps):
        xf = x.to(torch.float32)
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    x, w = (t.half() for t in inputs((2, 5, 64), (64,)))
    assert_declines(RULES, before, (x, w, torch.tensor(1e-5)), rule="rmsnorm_fp16",
                    reason="eps is not a compile-time constant")
