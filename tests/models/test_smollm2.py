"""SmolLM2-135M under backend="llmcompile": same greedy tokens as eager, static KV cache.

Slow (two Inductor compiles of a 30-layer model, ~3 min on 2 cores): run with `-m slow`.
The quickstart example and `llmcompile bench` (`match` column) check the same thing.
"""

import pytest
import torch

import llmcompile
from llmcompile.tools.models import greedy_generate, load_smollm2


@pytest.mark.slow
def test_smollm2_default_recipe_generates_eager_tokens(smollm2_path):
    model, tokenizer = load_smollm2()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    want = greedy_generate(model, model.forward, ids, 12)
    compiled = llmcompile.compile(model.forward, "default")
    assert greedy_generate(model, compiled, ids, 12) == want
    torch._dynamo.reset()
