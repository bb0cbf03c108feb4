"""llmcompile's CPU decode attention (``llmcompile_cpu.decode_attention``) and its lowering."""

import pytest
import torch

from llmcompile import ops
from llmcompile.core.program import capture_function
from llmcompile.lower.decode_attention import lower_decode_attention
from llmcompile.ops import kernels

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C++ toolchain for llmcompile's CPU kernels")


def _qkv(s: int, h: int, hkv: int, t: int, d: int, seed: int = 0, b: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, s, d, generator=g), torch.randn(b, hkv, t, d, generator=g),
            torch.randn(b, hkv, t, d, generator=g))


def _reference(q, k, v, keep, scale):
    """SDPA with K / V repeated per query head and a bool keep-mask [.., S, T]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    p = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no key: zeros
    return p @ v


@pytest.mark.parametrize("s, h, hkv", [(1, 9, 3), (3, 9, 3), (2, 4, 4), (1, 8, 1)])
@pytest.mark.parametrize("t, d", [(7, 64), (256, 64), (40, 20)])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "per-head", "causal"])
def test_kernel_matches_the_reference(s, h, hkv, t, d, mask):
    q, k, v = _qkv(s, h, hkv, t, d, seed=s * t + d)
    scale = d ** -0.5
    keep, arg, causal = None, None, False
    if mask == "bool":  # a static cache: the last positions not written yet
        keep = torch.arange(t) < t - t // 3
        arg = keep.view(1, 1, 1, t).expand(1, 1, s, t)
    elif mask == "float":
        keep = (torch.arange(t) % 3 != 1).view(1, 1, 1, t).expand(1, 1, s, t)
        arg = torch.zeros(1, 1, s, t).masked_fill(~keep, float("-inf")) + 0.25
    elif mask == "per-head":
        keep = torch.rand(1, h, s, t, generator=torch.Generator().manual_seed(1)) < 0.7
        arg = keep
    elif mask == "causal":  # bottom-right aligned: query i sees keys up to i + T - S
        causal = True
        keep = ops.attention_keep(s, t)
    got = torch.ops.llmcompile_cpu.decode_attention(q, k, v, arg, scale, causal)
    # (the float mask's +0.25 shifts every kept score alike: the softmax is unchanged)
    torch.testing.assert_close(got, _reference(q, k, v, keep, scale), rtol=1e-5, atol=1e-5)


def test_dropped_keys_are_not_read():
    """NaN in the positions the mask drops (a static cache's unwritten tail) never reach the
    output: the kernel does not read them."""
    q, k, v = _qkv(1, 9, 3, 64, 64)
    keep = torch.arange(64) < 40
    k[:, :, 40:], v[:, :, 40:] = float("nan"), float("nan")
    got = torch.ops.llmcompile_cpu.decode_attention(q, k, v, keep.view(1, 1, 1, 64), 0.125,
                                                    False)
    want = _reference(q, k[:, :, :40], v[:, :, :40], None, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_row_with_no_key_gives_zeros_and_bad_input_raises():
    q, k, v = _qkv(1, 4, 2, 8, 64)
    none = torch.zeros(1, 1, 1, 8, dtype=torch.bool)
    assert torch.ops.llmcompile_cpu.decode_attention(q, k, v, none, 0.1, False).eq(0).all()
    with pytest.raises(RuntimeError, match="float32 only"):
        torch.ops.llmcompile_cpu.decode_attention(q.double(), k.double(), v.double(), None,
                                                  0.1, False)
    with pytest.raises(RuntimeError, match="do not match q"):
        torch.ops.llmcompile_cpu.decode_attention(q, k[:, :, :, :32], v, None, 0.1, False)
    with pytest.raises(RuntimeError, match="bool or float32"):
        torch.ops.llmcompile_cpu.decode_attention(q, k, v, none.int(), 0.1, False)


def _program(s: int, t: int = 32, window: int = 0):
    q, k, v = _qkv(s, 9, 3, t, 64)
    keep = (torch.arange(t) < t - 5).view(1, 1, 1, t).expand(1, 1, s, t).contiguous()

    def fn(q, k, v, keep):
        return ops.attention(q, k, v, keep, 0.125, False, window) * 2

    return capture_function(fn, [q, k, v, keep], static=True), (q, k, v, keep), fn


def test_lowering_rewrites_decode_attention_only():
    prog, args, fn = _program(1)
    assert lower_decode_attention(prog) == 1
    prog.recompile()
    assert any("decode_attention" in str(n.target) for n in prog.graph.nodes)
    torch.testing.assert_close(prog.gm(*args), fn(*args), rtol=1e-5, atol=1e-5)
    prefill, _, _ = _program(6)  # 3 query heads per KV head x 6 rows > 16: the reference
    assert lower_decode_attention(prefill) == 0
    window, _, _ = _program(1, window=8)  # sparse: FlexAttention's lowering
    assert lower_decode_attention(window) == 0


def test_decode_with_a_static_cache_runs_the_kernel_and_matches_eager(monkeypatch, tmp_path):
    """llmcompile.generate on a tiny Llama (static cache, padded to a bucket): the kernel runs
    in the decode step and the greedy tokens are eager's."""
    import llmcompile
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    prompt = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ids = llmcompile.generate(model, prompt, "default", max_new_tokens=8)
    names = {e.key for e in prof.key_averages()}
    assert "llmcompile_cpu::decode_attention" in names, sorted(names)
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ids.equal(want)
