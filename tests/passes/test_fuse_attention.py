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


@pytest.mark.parametrize("target", ["eager", "inductor"])
def test_grouped_query_attention_drops_repeat_kv(target, tmp_path, monkeypatch):
    """transformers copies K/V per query head (repeat_kv) when a mask is given (a static
    cache): the rule feeds the cache itself to llmcompile.attention, logits unchanged."""
    from transformers import StaticCache

    import llmcompile
    from llmcompile import backend as B
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")  # 4 query heads, 2 KV heads
    recipe = llmcompile.load_recipe({"name": "unrepeat", "target": target,
                                     "passes": [{"name": "fuse"}]})
    from llmcompile.passes.fusion import FuseConfig

    assert "attention_unrepeat_kv_masked" in FuseConfig().rules().names  # on by default
    assert "attention_unrepeat_kv_masked" not in FuseConfig(unrepeat_kv=False).rules().names
    seen = {}

    def capture(gm, example_inputs):
        compiled, report = B.compile_graph(gm, example_inputs, recipe, {"fallback": False},
                                           lower=target != "eager")
        seen["report"], seen["gm"] = report, (compiled if target == "eager" else None)
        return compiled

    prompt = torch.randint(3, 250, (1, 4), generator=torch.Generator().manual_seed(1))

    def step(forward):
        cache = StaticCache(config=model.config, max_cache_len=32)
        with torch.no_grad():
            model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(4))
            return forward(input_ids=torch.tensor([[7]]), past_key_values=cache,
                           cache_position=torch.tensor([4])).logits

    expected = step(model.forward)
    got = step(torch.compile(model.forward, backend=capture, dynamic=False))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert seen["report"].counts()["attention_unrepeat_kv_masked"] == 2
    if seen["gm"] is not None:
        node = next(n for n in seen["gm"].graph.nodes if n.target is ops.attention.default)
        assert node.args[1].meta["val"].shape[1] == 2  # the cache's 2 KV heads, not 4


@pytest.mark.parametrize("rows", [1, 5, 9])  # decode (reductions) up to 16 rows a KV head; SDPA
@pytest.mark.parametrize("heads_kv", [H, 2])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal", "padded"])
def test_attention_paths_agree_with_sdpa(rows, heads_kv, mask_kind):
    torch.manual_seed(0)
    t = 9
    q = torch.randn(1, rows, H, E).transpose(1, 2)  # [B, H, S, E], as models lay it out
    k, v = torch.randn(1, heads_kv, t, E), torch.randn(1, heads_kv, t, E)
    keep = torch.rand(1, 1, rows, t) > 0.3
    keep[..., 0] = True
    if mask_kind == "padded":  # a fully masked query row (left padding): SDPA gives it 0
        keep[..., 0, :] = False
    mask = {"none": None, "bool": keep, "causal": None, "padded": keep,
            "float": torch.zeros(1, H, rows, t).masked_fill(~keep, float("-inf"))}[mask_kind]
    causal = mask_kind == "causal"
    full = ops.attention_keep(rows, t)[None, None] if causal else mask
    group = H // heads_kv
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1),
                                              v.repeat_interleave(group, 1), attn_mask=full,
                                              scale=0.3)
    torch.testing.assert_close(ops.attention(q, k, v, mask, 0.3, causal), expected,
                               rtol=1e-5, atol=1e-6)
