import math

import pytest
import torch
import torch.nn.functional as F

from llmcompile import ops
from llmcompile.passes.fuse_attention import RULES
from llmcompile.testing import assert_declines, check_rewrite

B, H, S, E = 2, 4, 6, 16


def qkv(heads_kv=H, t=S, mask_dtype=torch.float32):
    torch.manual_seed(0)
    q = torch.randn(B, H, S, E)
    k, v = torch.randn(B, heads_kv, t, E), torch.randn(B, heads_kv, t, E)
    causal = torch.ones(S, t, dtype=torch.bool).tril(t - S)
    if mask_dtype == torch.bool:
        return q, k, v, causal[None, None]
    mask = torch.zeros(B, 1, S, t).masked_fill(~causal, torch.finfo(torch.float32).min)
    return q, k, v, mask


def gpt2_eager(q, k, v, mask):
    # transformers' GPT-2 eager_attention_forward, in eval
    w = torch.matmul(q, k.transpose(-1, -2)) * E**-0.5
    w = F.softmax(w + mask, dim=-1).type(v.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v).transpose(1, 2)


def gptj_eager(q, k, v, mask):
    # transformers' GPTJAttention._attn: float32 casts, divide by sqrt(head_dim)
    w = torch.matmul(q.to(torch.float32), k.to(torch.float32).transpose(-1, -2))
    w = F.softmax(w / math.sqrt(E) + mask, dim=-1).to(v.dtype)
    return torch.matmul(w, v)


def test_gpt2_eager_attention():
    def expected(q, k, v, mask):
        return ops.attention(q, k, v, mask, E**-0.5).transpose(1, 2)

    check_rewrite(RULES, gpt2_eager, expected, qkv(), count={"attention_mul_masked": 1})


def test_gptj_eager_attention_divides():
    def expected(q, k, v, mask):
        return ops.attention(q, k, v, mask, 1 / math.sqrt(E))

    check_rewrite(RULES, gptj_eager, expected, qkv(), count={"attention_div_masked": 1})


@pytest.mark.parametrize("scaling", ["mul", "div", "none"])
def test_unmasked_attention(scaling):
    def before(q, k, v):
        s = q @ k.transpose(-2, -1)
        s = s * 0.5 if scaling == "mul" else s / 2.0 if scaling == "div" else s
        return s.softmax(-1) @ v

    def expected(q, k, v):
        return ops.attention(q, k, v, None, 1.0 if scaling == "none" else 0.5)

    check_rewrite(RULES, before, expected, qkv()[:3], count={f"attention_{scaling}": 1})


def test_declines_soft_capped_scores():
    def softcapped(q, k, v, mask):  # Gemma-2 style logit soft-capping
        s = torch.matmul(q, k.transpose(-2, -1)) * E**-0.5
        s = torch.tanh(s / 50.0) * 50.0
        return torch.matmul(F.softmax(s + mask, dim=-1), v)

    stats = assert_declines(RULES, softcapped, qkv(), rule="attention_mul_masked",
                            reason="found %tanh")
    assert stats.total == 0


def test_declines_boolean_mask_added_to_scores():
    def before(q, k, v, mask):
        return F.softmax(q @ k.transpose(-2, -1) * 0.25 + mask, dim=-1) @ v

    assert_declines(RULES, before, qkv(mask_dtype=torch.bool), rule="attention_mul_masked",
                    reason="not a keep-mask")


def test_sdpa_with_mask():
    def before(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25)

    def expected(q, k, v, mask):
        return ops.attention(q, k, v, mask, 0.25)

    check_rewrite(RULES, before, expected, qkv(mask_dtype=torch.bool), count={"sdpa_masked": 1})


def test_sdpa_causal_gqa():
    def before(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3,
                                              enable_gqa=True)

    def expected(q, k, v):
        return ops.attention(q, k, v, None, 0.3, True)

    check_rewrite(RULES, before, expected, qkv(heads_kv=2)[:3], count={"sdpa_causal_gqa": 1})


def test_sdpa_causal_declines_when_lengths_differ():
    def before(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    assert_declines(RULES, before, qkv(t=S + 3)[:3], rule="sdpa_causal", reason="top-left")


def test_sdpa_default_scale_needs_static_head_dim():
    # test graphs have symbolic sizes; Dynamo's head dims are static (they come from the config)
    def before(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    assert_declines(RULES, before, qkv()[:3], rule="sdpa", reason="static head dim")
