"""The ONNX Runtime target and ONNX export on tiny real architectures (CPU provider).

``torch.compile(..., target="onnxruntime")`` and exported files must match eager at fp32
precision, contain the expected contrib ops, and fail clearly (with the Inductor fallback for
``torch.compile``) where a graph cannot be exported.
"""

import dataclasses
import logging

import pytest
import torch

import llmcompile
from llmcompile import ops, quant
from llmcompile._compat import cache_kwarg
from llmcompile.backend import collect_reports, fallbacks
from llmcompile.lower import onnxruntime as lower
from llmcompile.testing import onnx_op_counts
from llmcompile.tools.models import ARCHITECTURES, tiny_model

pytest.importorskip("onnxruntime")

ORT = {"target": "onnxruntime", "fallback": False}
def last_session_ops() -> dict[str, int]:
    return onnx_op_counts(list(lower._SESSIONS.values())[-1].model.path)


@pytest.fixture(autouse=True)
def _fresh_sessions():
    lower._SESSIONS.clear()
    yield
    lower._SESSIONS.clear()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zoo_through_onnxruntime_matches_eager(arch, expected_onnx_ops):
    model = tiny_model(arch)
    compiled = torch.compile(model, backend="llmcompile", options=ORT, fullgraph=True)
    for length in (7, 11):  # the second length recompiles with a dynamic sequence
        ids = torch.randint(0, 256, (2, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            expected = model(input_ids=ids, use_cache=False).logits
            got = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        assert last_session_ops() == expected_onnx_ops[arch]  # static, then dynamic graph


def test_padding_mask_is_exported_as_standard_ops_and_stays_exact():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: not a causal mask, GroupQueryAttention cannot take it
    compiled = torch.compile(model, backend="llmcompile", options=ORT, fullgraph=True)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[1], expected[1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0, 2:], expected[0, 2:], atol=1e-4, rtol=1e-4)
    assert "GroupQueryAttention" not in last_session_ops()


def test_sessions_are_cached_per_graph_and_recipe():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        for _ in range(2):
            torch._dynamo.reset()
            torch.compile(model, backend="llmcompile", options=ORT)(input_ids=ids,
                                                                    use_cache=False)
    assert len(lower._SESSIONS) == 1


def test_missing_cuda_provider_warns_and_runs_on_cpu(caplog):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    lower._warned.clear()
    with caplog.at_level(logging.WARNING, logger="llmcompile"):
        assert lower.pick_provider(torch.device("cpu")) == "CPUExecutionProvider"
        lower.pick_provider(torch.device("cpu"))
    warnings = [r for r in caplog.records if "CPU provider" in r.getMessage()]
    assert len(warnings) == 1 and "onnxruntime-gpu" in warnings[0].getMessage()


def unsupported(x):
    return torch.linalg.eigh(x @ x.transpose(-1, -2)).eigenvalues


def test_unexportable_graph_names_the_op_and_falls_back(caplog):
    x = torch.randn(3, 4, 4)
    with pytest.raises(Exception, match="eigh"):
        torch.compile(unsupported, backend="llmcompile", options=ORT)(x)
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="llmcompile"), collect_reports() as reports:
        out = torch.compile(unsupported, backend="llmcompile",
                            options={"target": "onnxruntime"})(x)
    torch.testing.assert_close(out, unsupported(x))
    warned = [r.getMessage() for r in caplog.records if "plain Inductor" in r.getMessage()]
    assert len(warned) == 1 and "lowering to onnxruntime failed" in warned[0], warned
    assert "runs on plain Inductor instead" in warned[0] and "eigh" in warned[0]
    assert reports[-1].fallback_stage == "lower" and "eigh" in reports[-1].fallback
    assert "FALLBACK (lower)" in reports[-1].format()
    assert reports[-1] in fallbacks()


class Unsupported(torch.nn.Module):
    def forward(self, x):
        return unsupported(x)


def test_explain_lists_the_fallback_with_its_cause():
    recipe = dataclasses.replace(llmcompile.load_recipe("default"), target="onnxruntime")
    reports = llmcompile.explain(Unsupported(), recipe, example_inputs=(torch.randn(3, 4, 4),))
    assert len(reports) == 1 and reports[0].fallback_stage == "lower"
    assert "eigh" in reports[0].fallback


# --- MatMulNBits: layouts and translation ------------------------------------------------

def test_int4_nbits_layout_round_trips():
    w = torch.randn(48, 96)
    q = quant.quantize_int4(w, 32, integer_zero=True)
    qweight, scales, zeros = quant.int4_nbits(q, torch.float32)
    x = torch.randn(5, 96)
    got = ops.matmul_nbits(x, qweight, scales, zeros, 96, 4, 32)
    torch.testing.assert_close(got, x @ q.dequantize().T, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="integer_zero"):
        quant.int4_nbits(quant.quantize_int4(w, 32), torch.float32)


def test_int8_nbits_layout_round_trips_with_padding():
    w = torch.randn(16, 40)  # K = 40 is not a multiple of the 32-wide block
    q, s = quant.quantize_int8(w)
    qweight, scales = quant.int8_nbits(q, s, torch.float32)
    x = torch.randn(3, 40)
    got = ops.matmul_nbits(x, qweight, scales, None, 40, 8, 32)
    torch.testing.assert_close(got, x @ (q.float() * s[:, None]).T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_translation_matches_reference(tmp_path, bits):
    w = torch.randn(64, 96)
    if bits == 4:
        qweight, scales, zeros = quant.int4_nbits(quant.quantize_int4(w, 32, integer_zero=True),
                                                  torch.float32)
    else:
        qweight, scales = quant.int8_nbits(*quant.quantize_int8(w), torch.float32)
        zeros = None
    bias = torch.randn(64)

    def fn(x):
        return ops.matmul_nbits(x, qweight, scales, zeros, 96, bits, 32, 0, bias)

    x = torch.randn(2, 5, 96)
    compiled = torch.compile(fn, backend="llmcompile", options=ORT)
    torch.testing.assert_close(compiled(x), fn(x), atol=1e-4, rtol=1e-4)
    assert last_session_ops() == {"MatMulNBits": 1}


def _nbits_table(bits: int, n: int = 40, k: int = 96):
    """A table quantized in MatMulNBits' layout (3 blocks of 32: an odd block count)."""
    w = torch.randn(n, k)
    if bits == 4:
        q = quant.quantize_int4(w, 32, integer_zero=True)
        return (*quant.int4_nbits(q, torch.float32), q.dequantize())
    q, s = quant.quantize_int8(w)
    return (*quant.int8_nbits(q, s, torch.float32), None, q.float() * s[:, None])


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_nbits_rows_are_the_matmul_nbits_weight(bits):
    qweight, scales, zeros, dequantized = _nbits_table(bits)
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    rows = ops.gather_nbits(qweight, ids, scales, zeros, 96, bits, 32)
    assert rows.shape == (2, 3, 96)
    torch.testing.assert_close(rows, dequantized[ids], atol=1e-5, rtol=1e-5)
    # the same bytes as MatMulNBits reads them: its weight is eye(K) @ W^T
    weight_t = ops.matmul_nbits(torch.eye(96), qweight, scales, zeros, 96, bits, 32)
    torch.testing.assert_close(rows.reshape(-1, 96), weight_t.T[ids.reshape(-1)])


@pytest.mark.parametrize("bits", [4, 8])
def test_gather_nbits_translation_matches_reference(bits):
    qweight, scales, zeros, _ = _nbits_table(bits)

    def fn(ids):
        return ops.gather_nbits(qweight, ids, scales, zeros, 96, bits, 32) * 2.0

    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    compiled = torch.compile(fn, backend="llmcompile", options=ORT)
    torch.testing.assert_close(compiled(ids), fn(ids), atol=1e-5, rtol=1e-5)
    assert last_session_ops().get("GatherBlockQuantized") == 1


@pytest.mark.parametrize("past, positions", [(0, [[0, 1, 2, 3]] * 2), (5, [[5]] * 2),
                                             (5, [[9], [2]])])  # any positions, per row
def test_packed_attention_translation_matches_reference(past, positions):
    heads, kv_heads, e, limit = 4, 2, 16, 64
    angles = torch.arange(limit).float()[:, None] / (10000 ** (torch.arange(0, e, 2) / e))
    cos, sin = angles.cos(), angles.sin()

    def fn(qkv, past_k, past_v, pos):
        return ops.packed_attention(qkv, past_k, past_v, cos, sin, pos, heads, kv_heads, 0.25)

    pos = torch.tensor(positions)
    qkv = torch.randn(2, pos.shape[1], (heads + 2 * kv_heads) * e)
    past_k, past_v = torch.randn(2, 2, kv_heads, past, e).unbind(0)
    got = torch.compile(fn, backend="llmcompile", options=ORT)(qkv, past_k, past_v, pos)
    for a, b in zip(got, fn(qkv, past_k, past_v, pos)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert last_session_ops() == {"GroupQueryAttention": 1}


# --- export for deployment -----------------------------------------------------------------

def test_static_kv_cache_written_in_place_is_copied_back():
    from transformers import StaticCache

    model = tiny_model("llama")
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    compiled = torch.compile(model.forward, backend="llmcompile", options=ORT)

    def steps(forward):
        cache = StaticCache(config=model.config, max_cache_len=16)
        positions, out = torch.arange(8), []
        kw = {cache_kwarg(model): cache}
        with torch.no_grad():
            out.append(forward(input_ids=ids, **kw, cache_position=positions,
                               use_cache=True).logits)
            for token in (5, 77, 130, 9):  # each decode step reads every earlier write
                positions = positions[-1:] + 1
                out.append(forward(input_ids=torch.tensor([[token]]), **kw,
                                   cache_position=positions, use_cache=True).logits)
        return out

    for got, expected in zip(steps(compiled), steps(model.forward)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    assert any(r.model.mutations for r in lower._SESSIONS.values())


class HeadNorm(torch.nn.Module):
    """Residual add + RMSNorm over each head ([B, H, S, D]: Hunyuan's q/k norms)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.rand(16) + 0.5)

    def forward(self, x, residual):
        h = x + residual
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight, h


def test_residual_norm_over_heads_runs_in_onnxruntime():
    # SkipSimplifiedLayerNormalization takes 2-d or 3-d inputs: 4-d ones are reshaped around it
    module = HeadNorm()
    x, r = torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 16)
    compiled = torch.compile(module, backend="llmcompile", options=ORT)
    with torch.no_grad(), collect_reports() as reports:
        got = compiled(x, r)
        want = module(x, r)
    assert reports[0].fired("add_rmsnorm") == 1
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert last_session_ops() == {"SkipSimplifiedLayerNormalization": 1}


class ReturnsAFoldedWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return x @ self.w, self.w.t() * 2  # the second output folds into a constant


def test_an_output_folded_from_weights_alone_is_returned_by_the_host():
    # regression: "ValueError: 'b__llmc_folded_0' is not in list" (fallback False), or a
    # silent Inductor fallback: the ONNX graph does not output constants, the host does
    module, x = ReturnsAFoldedWeight(), torch.randn(3, 8)
    compiled = torch.compile(module, backend="llmcompile", options=ORT)
    with torch.no_grad(), collect_reports() as reports:
        got = compiled(x)
        want = module(x)
    assert reports and reports[0].fallback is None
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
