"""llmcompile's CPU decode kernels (``llmcompile_cpu``) and the lowering that uses them."""

import pytest
import torch
import torch.nn.functional as F

from llmcompile import ops
from llmcompile.core.program import capture_function
from llmcompile.lower.gemv import lower_cpu_gemv
from llmcompile.ops import kernels
from llmcompile.quant.formats import quantize_int8

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="no C++ toolchain for llmcompile's CPU kernels")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("k", [64, 576])
def test_float32_and_int8_kernels_match_the_reference(rows, k):
    g = torch.Generator().manual_seed(rows * k)
    x, w = torch.randn(rows, k, generator=g), torch.randn(96, k, generator=g)
    torch.testing.assert_close(torch.ops.llmcompile_cpu.linear_f32(x, w), x @ w.T,
                               rtol=1e-4, atol=1e-4)
    q, s = quantize_int8(w)
    torch.testing.assert_close(torch.ops.llmcompile_cpu.linear_int8(x, q, s),
                               x @ (q.float() * s[:, None]).T, rtol=1e-4, atol=1e-4)


def _int4_case(rows: int, group: int, n: int = 48, k: int = 256):
    g = torch.Generator().manual_seed(rows + group)
    x = torch.randn(rows, k, generator=g)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(n, k // group, generator=g).half()
    low = torch.randn(n, k // group, generator=g).half()
    return x, q, scale, low


def _nibbles(q: torch.Tensor, group: int) -> torch.Tensor:
    n, k = q.shape
    groups, half = q.view(n, k // group, group), group // 2
    # byte j of a group: value j (low nibble), value j + G/2 (high nibble)
    return (groups[..., :half] | (groups[..., half:] << 4)).reshape(n, k // 2).contiguous()


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("group, k", [(64, 256), (64, 576), (128, 256)])  # 576: 9 groups (odd)
def test_int4_kernel_matches_the_reference(rows, group, k):
    """Activations are quantized to int8 per (row, group); the rest is exact."""
    x, q, scale, low = _int4_case(rows, group, k=k)
    n, k = q.shape
    xg = x.view(rows, k // group, group)
    step = xg.abs().amax(-1, keepdim=True) / 127
    x_hat = torch.round(xg / step) * step
    scale, low = scale.float(), low.float()
    qg = q.view(n, k // group, group).float() * scale[..., None]
    want = torch.einsum("mgj,ngj->mn", x_hat, qg) + torch.einsum("mg,ng->mn", xg.sum(-1), low)
    got = torch.ops.llmcompile_cpu.linear_int4(x, _nibbles(q, group), scale.half(), low.half(),
                                               group)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    w = (q.view(n, k // group, group).float() * scale[..., None] + low[..., None]).view(n, k)
    exact = x @ w.T  # and the int8 activations cost little against the float product
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()


def test_int4_unpacks_from_atens_pack():
    from llmcompile.lower.gemv import unpack_int4
    from llmcompile.quant.formats import quantize_int4

    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(3))
    q4 = quantize_int4(w, 64)
    packed, sz = q4.pack_cpu(torch.float32)
    nib, scale, low = unpack_int4(packed, sz, 64)
    assert nib.equal(_nibbles(q4.q, 64))
    assert scale.dtype == low.dtype == torch.float16  # rounded once: 2^-11 relative
    torch.testing.assert_close(scale.float(), q4.scale, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(low.float(), q4.low, rtol=1e-3, atol=1e-6)
    assert unpack_int4(packed, sz, 64)[0] is nib  # once per pack


def test_bad_shapes_raise_clear_errors():
    x = torch.randn(1, 64)
    with pytest.raises(RuntimeError, match="does not match x's K"):
        torch.ops.llmcompile_cpu.linear_f32(x, torch.randn(8, 32))
    with pytest.raises(RuntimeError, match="multiple of"):
        torch.ops.llmcompile_cpu.linear_f32(torch.randn(1, 40), torch.randn(8, 40))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.llmcompile_cpu.linear_f32(x.double(), torch.randn(8, 64).double())
    x, q, scale, low = _int4_case(1, 32)
    with pytest.raises(RuntimeError, match="group size"):
        torch.ops.llmcompile_cpu.linear_int4(x, _nibbles(q, 32), scale, low, 32)


def _program(rows: int, kind: str = "f32"):
    """A linear + relu on ``[1, rows, 128]``, the weight float, int8 or int4 as the pass packs
    it; (program, weights, eager reference)."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    x = torch.randn(1, rows, 128)
    if kind == "int8":
        q, s = quantize_int8(w)
        weights = (q, s.bfloat16(), b)
        fn = lambda x, q, s, b: ops.int8_linear(x, q, s, b).relu()  # noqa: E731
    elif kind == "int4":
        from llmcompile.quant.formats import quantize_int4

        weights = (*quantize_int4(w, 64).pack_cpu(torch.bfloat16), b)
        fn = lambda x, p, sz, b: ops.int4_linear(x, p, sz, 64, b).relu()  # noqa: E731
    else:
        weights = (w, b)
        fn = lambda x, w, b: F.linear(x, w, b).relu()  # noqa: E731
    prog = capture_function(fn, [x, *weights], weights=tuple(range(1, len(weights) + 1)))
    return prog, weights, lambda x: fn(x, *weights)


@pytest.mark.parametrize("kind", ["f32", "int8", "int4"])
def test_lowering_rewrites_decode_linears_only(kind):
    decode, weights, ref = _program(1, kind)
    assert lower_cpu_gemv(decode) == 1
    decode.recompile()
    targets = {str(n.target) for n in decode.graph.nodes}
    assert any(t.startswith("<function gemv_") for t in targets), targets
    x = torch.randn(1, 1, 128, generator=torch.Generator().manual_seed(1))
    got, want = decode.gm(x, *weights), ref(x)
    if kind == "int4":  # int8 activations here, bfloat16 in ATen's kernel: 1 % of the range on
        assert (got - want).abs().max() <= 0.03 * want.abs().max()  # average, 3 % at most
    else:
        tol = 1e-4 if kind == "f32" else 3e-2  # ATen's int8 kernel: bfloat16 activations
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    prefill, _, _ = _program(kernels.MAX_ROWS + 1, kind)  # more rows: ATen keeps it
    assert lower_cpu_gemv(prefill) == 0


def test_kernels_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("LLMCOMPILE_CPU_KERNELS", "0")
    decode, _, _ = _program(1)
    assert not kernels.available() and lower_cpu_gemv(decode) == 0


def test_compiled_decode_uses_the_kernels_and_matches_eager(monkeypatch, tmp_path):
    """A static one-token graph through the backend: the kernels run and the logits match."""
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (1, 1))
    compiled = torch.compile(model, backend="llmcompile", dynamic=False,
                             options={"recipe": "int8", "fallback": False})
    with torch.no_grad():
        compiled(ids)  # compiles
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = compiled(ids).logits
        want = model(ids).logits
    names = {e.key for e in prof.key_averages()}
    assert "llmcompile_cpu::linear_int8" in names, sorted(names)
    assert "aten::_weight_int8pack_mm" not in names
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # int8 weights vs float
    assert got.argmax(-1).equal(want.argmax(-1))


@pytest.mark.parametrize("group", [64, 128])
def test_stored_int4_layout_equals_unpacking_atens_pack(group):
    """The quantize pass stores the decode kernel's layout computed from the int4 values;
    it must be what unpacking ATen's pack gives (the lowering then skips the unpacking)."""
    from llmcompile import quant
    from llmcompile.lower.gemv import _UNPACKED, unpack_int4
    from llmcompile.ops import cpu

    wq = quant.quantize_int4(torch.randn(48, 256), group)
    packed, sz = wq.pack_cpu(torch.bfloat16)
    _UNPACKED.pop(packed, None)
    for got, want in zip(cpu.int4_kernel_layout(wq.q, sz, group), unpack_int4(packed, sz, group)):
        assert torch.equal(got, want)
