"""ONNX Runtime GenAI runs a folder written by ``llmcompile.export`` (its ``genai_config.json``):
same greedy tokens and the same logits at every step as ``OnnxCausalLM`` on the same file."""

import json

import numpy as np
import pytest
import torch

from llmcompile import OnnxCausalLM, export
from llmcompile.tools.models import tiny_model

og = pytest.importorskip("onnxruntime_genai", reason="pip install -e '.[genai]'")


def _genai_steps(folder, ids: list[int], new_tokens: int) -> tuple[list[int], list[np.ndarray]]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    tokens, logits = [], []
    while not generator.is_done():
        generator.generate_next_token()
        logits.append(np.array(generator.get_output("logits"))[0, -1])
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens, logits


@pytest.mark.parametrize("recipe", ["default", "int4-rtn"])
def test_genai_generates_the_runners_tokens(tmp_path, recipe):
    torch.manual_seed(0)
    model = tiny_model("llama")
    result = export(model, tmp_path / "model.onnx", recipe)
    config = json.loads((tmp_path / "genai_config.json").read_text())
    assert config["model"]["decoder"]["filename"] == "model.onnx"
    assert config["search"]["past_present_share_buffer"] is False
    ids = torch.randint(3, 256, (12,), generator=torch.Generator().manual_seed(2)).tolist()
    tokens, logits = _genai_steps(tmp_path, ids, 10)
    lm = OnnxCausalLM(result.path)
    assert tokens == lm.generate(ids, 10, eos_token_id=-1)
    step, past = lm.forward(np.array([ids]))
    for i, token in enumerate(tokens):  # the runner's logits at every step, fed GenAI's tokens
        np.testing.assert_allclose(logits[i], step[0, -1], atol=1e-4, rtol=1e-4)
        step, past = lm.forward(np.array([[token]]), past)
