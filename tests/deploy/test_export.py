"""ONNX export for deployment (``llmcompile.export``) and the file runner (``OnnxCausalLM``) on
tiny real architectures: valid files with contrib ops and named axes, eager's tokens, a batch
with a KV cache, packed int4 weights, and clear refusals."""

import numpy as np
import onnx
import pytest
import torch
from transformers import GPTJForCausalLM

from llmcompile import OnnxCausalLM, export, ops, quant
from llmcompile.lower.onnxruntime import OnnxLoweringError
from llmcompile.testing import onnx_op_counts
from llmcompile.tools.models import ARCHITECTURES, greedy_generate, tiny_model

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def exported_llama(tmp_path_factory):
    model = tiny_model("llama")
    result = export(model, tmp_path_factory.mktemp("llama") / "model.onnx")
    return model, result


def test_exported_file_is_valid_with_contrib_ops_and_named_axes(exported_llama,
                                                                  expected_export_ops):
    _, result = exported_llama
    onnx.checker.check_model(str(result.path), full_check=True)
    assert onnx_op_counts(result.path) == expected_export_ops["llama"]
    graph = onnx.load(str(result.path), load_external_data=False).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["past_key_values.1.value"] == ["batch", 2, "past_sequence", 16]
    assert dims["present.0.key"] == ["batch", 2, "total_sequence", 16]
    assert result.path.with_name("model.onnx.data").stat().st_size > 0  # external weights
    assert result.report.fired("cached_attention") == 2


def test_exported_file_generates_eager_greedy_tokens(exported_llama):
    model, result = exported_llama
    lm = OnnxCausalLM(result.path)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(1))
    assert lm.generate(ids[0].tolist(), 12, eos_token_id=-1) == greedy_generate(
        model, model.forward, ids, 12)


def test_exported_file_decodes_a_batch_with_a_cache(exported_llama):
    model, result = exported_llama
    lm = OnnxCausalLM(result.path)
    ids = torch.randint(3, 256, (2, 6))
    nxt = torch.randint(3, 256, (2, 1))
    _, past = lm.forward(ids.numpy())
    logits, present = lm.forward(nxt.numpy(), past)
    with torch.no_grad():
        expected = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1:]
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=1e-4)
    assert present[0].shape == (2, 2, 7, 16)


def test_int4_export_holds_packed_weights_only(tmp_path, exported_llama):
    model, fp32 = exported_llama
    result = export(model, tmp_path / "int4.onnx", "int4-rtn")
    assert onnx_op_counts(result.path)["MatMulNBits"] == 8  # 4 GEMMs per layer; lm_head skipped
    graph = onnx.load(str(result.path), load_external_data=False).graph
    big_floats = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
                  and np.prod(i.dims) >= 64 * 64 and "lm_head" not in i.name
                  and "embed" not in i.name and "rotary" not in i.name]
    assert not big_floats, big_floats  # no dequantized copy of a quantized weight
    lm = OnnxCausalLM(result.path)
    ids = torch.randint(3, 256, (1, 8))
    logits, _ = lm.forward(ids.numpy())
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    assert np.abs(logits - expected).max() < 0.25 * np.abs(expected).max()


@pytest.mark.parametrize("bits", [4, 8])
def test_tied_embedding_is_read_from_the_quantized_lm_head(tmp_path, bits):
    from llmcompile.core.recipe import Recipe

    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    recipe = Recipe.from_dict({"name": f"all-int{bits}", "passes": [
        {"name": "fuse"}, {"name": "quantize_weights", "bits": bits, "group_size": 32}]})
    result = export(model, tmp_path / "model.onnx", recipe)
    assert result.report.fired(f"int{bits}_embedding_tied") == 1
    assert onnx_op_counts(result.path)["GatherBlockQuantized"] == 1
    graph = onnx.load(str(result.path), load_external_data=False).graph
    floats = [i.name for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT
              and np.prod(i.dims) >= 256 * 64 and "rotary" not in i.name]
    assert not floats, floats  # no float table left
    gather = next(n for n in graph.node if n.op_type == "GatherBlockQuantized")
    producers = {o: n for n in graph.node for o in n.output}
    source = producers[gather.input[0]].input[0]  # a Reshape of the LM head's initializer
    readers = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == source]
    assert len(readers) == 1 and readers[0].attribute  # the LM head: [vocab, ...] bytes
    assert next(i for i in graph.initializer if i.name == source).dims[0] == 256
    ids = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    logits, _ = OnnxCausalLM(result.path).forward(ids.numpy())
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    bound = 0.25 if bits == 4 else 0.05
    assert np.abs(logits - expected).max() < bound * np.abs(expected).max()


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zoo_exports_and_decodes_like_eager(arch, tmp_path, expected_export_ops):
    model = tiny_model(arch)
    if arch == "gptj" and not GPTJForCausalLM._supports_sdpa:
        # before transformers 5.24 GPT-J computed attention by hand: refused, not exported
        with pytest.raises(OnnxLoweringError, match="0 of 2 layers"):
            export(model, tmp_path / "model.onnx")
        return
    result = export(model, tmp_path / "model.onnx")
    assert onnx_op_counts(result.path) == expected_export_ops[arch]
    lm = OnnxCausalLM(result.path)
    ids, nxt = torch.randint(3, 256, (2, 6)), torch.randint(3, 256, (2, 1))
    prefill, past = lm.forward(ids.numpy())
    step, _ = lm.forward(nxt.numpy(), past)
    with torch.no_grad():
        expected = model(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits.numpy()
    np.testing.assert_allclose(prefill, expected[:, :6], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(step, expected[:, 6:], atol=1e-4, rtol=1e-4)


def _hand_written_attention(model):
    """A tiny Llama whose attention computes softmax(QKᵀ)V itself, bypassing transformers'
    attention interface (as GPT-J did before transformers 5.24)."""

    def attention(attn, hidden_states, *args, **kwargs):
        b, s, _ = hidden_states.shape
        shape = (b, s, -1, attn.head_dim)
        q, k, v = (proj(hidden_states).view(shape).transpose(1, 2)  # [B, H, S, D]
                   for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        k, v = (t.repeat_interleave(attn.num_key_value_groups, 1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) * attn.scaling
        causal = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
        out = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return attn.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None

    for layer in model.model.layers:
        layer.self_attn.forward = attention.__get__(layer.self_attn)
    return model


def test_hand_written_attention_refuses_export(tmp_path):
    # attention routed through no interface would lose its causal mask in the file
    with pytest.raises(OnnxLoweringError, match="0 of 2 layers"):
        export(_hand_written_attention(tiny_model("llama")), tmp_path / "hand.onnx")


def test_export_errors_are_clear(tmp_path):
    with pytest.raises(OnnxLoweringError, match="CPU Inductor kernels"):
        from llmcompile.core.program import capture_function
        from llmcompile.lower.onnxruntime import _check_supported

        packed = quant.quantize_int4(torch.randn(32, 64), 32).pack_cpu()
        program = capture_function(lambda x: ops.int4_linear(x, *packed, 32),
                                   [torch.randn(2, 64)])
        _check_supported(program)
    with pytest.raises(ValueError, match="unknown tiny architecture|cannot load model"):
        export("no-such-model", tmp_path / "x.onnx")


def test_ops_a_provider_lacks_are_emitted_as_standard_onnx_and_noted(tmp_path):
    model = tiny_model("llama")
    # ONNX Runtime's CUDA GroupQueryAttention has no float32 kernel: standard ops instead
    result = export(model, tmp_path / "cuda-fp32.onnx", provider="CUDAExecutionProvider")
    assert any("GroupQueryAttention" in note for note in result.notes), result.notes
    assert "GroupQueryAttention" not in onnx_op_counts(result.path)
    lm = OnnxCausalLM(result.path, provider="CPUExecutionProvider")  # any provider runs it
    ids = torch.randint(3, 256, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(lm.forward(ids.numpy())[0], expected, atol=1e-4, rtol=1e-4)


def test_bench_counts_weights_read_per_token(exported_llama):
    from llmcompile.tools.bench_onnx import _bytes_per_token

    _, result = exported_llama
    read = _bytes_per_token(result.path)
    embedding = 256 * 64 * 4  # only gathered from: not read whole per token
    assert 0 < read <= result.size_bytes - embedding


class ByteTokenizer:
    """Bytes as token ids (the tiny models' vocabulary is 256): enough to calibrate on."""

    def __call__(self, text, return_tensors=None):
        return type("Encoded", (), {"input_ids": torch.tensor([list(text.encode())[:4096]])})()

    def save_pretrained(self, folder):
        pass


def test_export_reports_its_stages_with_calibration_apart(tmp_path):
    import llmcompile

    recipe = llmcompile.load_recipe({"name": "awq4", "passes": [
        {"name": "quantize_weights", "bits": 4, "group_size": 32, "method": "awq",
         "calibration": {"samples": 2, "seq_len": 256}}]})
    result = export(tiny_model("llama"), tmp_path / "m.onnx", recipe, tokenizer=ByteTokenizer())
    stages = result.seconds
    assert {"capture", "recipe", "calibration", "lowering", "writing", "checking",
            "files"} <= set(stages), stages
    assert all(v >= 0 for v in stages.values()) and stages["calibration"] > 0
    rtn = export(tiny_model("llama"), tmp_path / "r.onnx", "int4-rtn")
    assert "calibration" not in rtn.seconds and rtn.seconds["writing"] > 0
