"""`llmcompile profile`: op classification and the decode-step split on a tiny model."""

import pytest

from llmcompile.tools.profile import CLASSES, classify, profile_decode


@pytest.mark.parametrize("name, shapes, want", [
    ("aten::mm", [[1, 64], [64, 256]], "LM head"),
    ("aten::_weight_int8pack_mm", [[1, 64], [256, 64], [256]], "LM head"),
    ("aten::_weight_int8pack_mm", [[1, 64], [192, 64], [192]], "packed int8 matmul"),
    ("aten::_weight_int4pack_mm_for_cpu", [[1, 64], [96, 32], [2, 96, 2]],
     "packed int4 matmul"),
    ("aten::addmm", [[192], [1, 64], [64, 192]], "float matmul"),
    ("llmcompile_cpu::linear_f32", [[1, 64], [192, 64]], "float matmul"),
    ("llmcompile_cpu::linear_int8", [[1, 64], [256, 64], [256]], "LM head"),
    ("llmcompile_cpu::linear_int8", [[1, 64], [192, 64], [192]], "packed int8 matmul"),
    ("llmcompile_cpu::linear_int4", [[1, 64], [192, 32], [192, 1], [192, 1], []],
     "packed int4 matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", [], "attention"),
    ("graph_3_cpp_fused_index_copy_2", [], "cache writes"),
    ("graph_1_cpp_fused__softmax_amax_index_copy_sum_1", [], "attention"),
    ("graph_3_cpp_fused__to_copy_add_mean_mul_pow_rsqrt_0", [], "other generated kernels"),
    ("aten::index_copy_", [], "cache writes"),
    ("aten::argmax", [], "other ATen ops"),
    ("aten::view", [], None),
    ("## Call CompiledFxGraph abc ##", [], None),
    ("Torch-Compiled Region: 0/0", [], None),
])
def test_classify(name, shapes, want):
    assert classify(name, shapes, vocab=256) == want


def test_profile_decode_splits_the_step_of_a_tiny_model(tmp_path, monkeypatch):
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    split = profile_decode(model, "int8", prompt_len=8, steps=6, repeats=1)
    assert split.step_ms > 0 and split.tokens_per_s == pytest.approx(1e3 / split.step_ms)
    assert set(split.ms) <= set(CLASSES)
    # int8 packs every linear, LM head included; the generated kernels are named
    assert split.ms.get("packed int8 matmul", 0) > 0 and split.ms.get("LM head", 0) > 0
    assert split.ms.get("other generated kernels", 0) > 0
    assert split.ms.get("attention", 0) > 0  # decode attention, fused with the cache write
    assert sum(split.ms.values()) == pytest.approx(split.step_ms, rel=1e-6) or \
        split.ms["overhead"] == 0
    text = split.format(top=3)
    assert "ms / step" in text and "overhead" in text
