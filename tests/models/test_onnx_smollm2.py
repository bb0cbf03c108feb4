"""SmolLM2-135M exported with ``llmcompile.export`` and run by ONNX Runtime (CPU provider).

* fp32 (default recipe): the file generates the same greedy tokens as eager PyTorch and holds
  the fused contrib ops of all 30 layers (default run, about a minute);
* int4 (the calibrated preset; LM head and tied embedding in 4 bits, one copy): at most 16 %
  of the fp32 file, its perplexity on held-out text within the quantization bound (15 % over
  fp32), and ONNX Runtime GenAI (``genai_config.json``) generates the runner's greedy tokens
  from the folder. Slow (AWQ + GPTQ on 30 layers, about 3 min on 2 cores): run with
  ``-m slow``; `llmcompile bench-onnx` measures the same files for BENCHMARKS.md.
"""

import collections
from types import SimpleNamespace

import onnx
import pytest
import torch

from llmcompile import export
from llmcompile.deploy.runner import OnnxCausalLM
from llmcompile.tools.models import greedy_generate, load_smollm2

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_smollm2()


@pytest.fixture(scope="module")
def fp32_file(smollm2, tmp_path_factory):
    model, _ = smollm2
    return export(model, tmp_path_factory.mktemp("fp32") / "model.onnx", "default")


def test_fp32_file_generates_eager_tokens(smollm2, fp32_file):
    model, tokenizer = smollm2
    ops = collections.Counter(n.op_type for n in onnx.load(
        str(fp32_file.path), load_external_data=False).graph.node)
    assert ops["GroupQueryAttention"] == 30 and "RotaryEmbedding" not in ops  # do_rotary
    assert ops["SkipSimplifiedLayerNormalization"] == 60
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    lm = OnnxCausalLM(fp32_file.path, threads=2)
    assert lm.generate(ids[0].tolist(), 12, eos_token_id=-1) == greedy_generate(
        model, model.forward, ids, 12)


@pytest.mark.slow
def test_int4_file_is_small_within_the_perplexity_bound_and_runs_in_genai(
        smollm2, smollm2_path, fp32_file, tmp_path):
    from llmcompile.tools.quality import DEFAULT_TEXT, _windows, perplexity

    model, tokenizer = smollm2
    int4 = export(model, tmp_path / "int4.onnx", "int4", tokenizer=str(smollm2_path))
    assert int4.size_bytes <= 0.16 * fp32_file.size_bytes, (int4.size_bytes,
                                                             fp32_file.size_bytes)
    lm = OnnxCausalLM(int4.path, threads=2)

    def ort_forward(input_ids, use_cache=False):
        return SimpleNamespace(logits=torch.from_numpy(lm.forward(input_ids.numpy())[0]))

    windows = _windows(tokenizer, DEFAULT_TEXT.read_text(), 3, 512)
    base = perplexity(model, windows, progress=False)
    quantized = perplexity(ort_forward, windows, progress=False)
    assert quantized < 1.15 * base, (quantized, base)

    og = pytest.importorskip("onnxruntime_genai")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids[0].tolist()
    genai = og.Model(str(tmp_path))
    params = og.GeneratorParams(genai)
    params.set_search_options(max_length=len(ids) + 16)
    generator = og.Generator(genai, params)
    generator.append_tokens(ids)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    assert tokens == lm.generate(ids, 16, eos_token_id=-1)
