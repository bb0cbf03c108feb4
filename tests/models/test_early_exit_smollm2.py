"""Early exit on SmolLM2 (slow: several Inductor compiles of a 30-layer model; `-m slow`).

Self-speculative generation with the ``early-exit`` preset is token for token the full model's
greedy output over several prompts, EOS inside a drafted block included; a distilled exit head
agrees with the full model more often than the shared head at the same layer.
"""

import pytest
import torch

import llmcompile
from llmcompile.tools.exits import agreement, held_out_tokens

PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "def fibonacci(n):"]


@pytest.mark.slow
def test_speculative_is_token_for_token_the_full_model(smollm2_path):
    from llmcompile.tools.models import load_smollm2

    model, tokenizer = load_smollm2()
    for text in PROMPTS:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        for recipe in ("early-exit", {"name": "k3", "passes": [
                {"name": "fuse"}, {"name": "early_exit", "layers": [20], "draft_tokens": 3}]}):
            got, stats = llmcompile.generate(model, ids, recipe, max_new_tokens=24,
                                             return_stats=True)
            assert torch.equal(got, want), (text, recipe)
            assert stats.verifications >= 1
    # EOS inside a drafted block: stop exactly where the full model emits it
    new = want[0, ids.shape[1]:].tolist()
    eos = new[9]
    got = llmcompile.generate(model, ids, {"name": "k3", "passes": [
        {"name": "fuse"}, {"name": "early_exit", "layers": [20], "draft_tokens": 3}]},
        max_new_tokens=24, eos_token_id=eos)
    assert got[0, ids.shape[1]:].tolist() == new[:new.index(eos) + 1]
    torch._dynamo.reset()


@pytest.mark.slow
def test_distilled_head_agrees_more_than_the_shared_head(smollm2_path):
    from llmcompile.deploy.exit_heads import train_adapter
    from llmcompile.quant.calibrate import calibration_tokens
    from llmcompile.tools.models import load_smollm2

    model, tokenizer = load_smollm2()
    adapter = train_adapter(model, calibration_tokens(tokenizer, None, 2048), 10, steps=80,
                            progress=False)
    held_out = held_out_tokens(tokenizer, 512)
    shared = agreement(model, held_out, [10])[10]
    distilled = agreement(model, held_out, [10], adapters={10: adapter})[10]
    assert distilled > shared + 0.05, (shared, distilled)


CONFIDENT_BOUND = 0.10  # perplexity change at the default threshold (0.9), BENCHMARKS.md


@pytest.mark.slow
def test_confident_exit_stays_within_its_perplexity_bound(smollm2_path):
    import math

    from llmcompile.tools.exits import confident_perplexity
    from llmcompile.tools.models import load_smollm2

    model, tokenizer = load_smollm2()
    tokens = held_out_tokens(tokenizer, 100_000)[4000:4000 + 64 + 256 + 1]
    with torch.no_grad():
        logp = model(tokens[None]).logits[0].float().log_softmax(-1)
    full = math.exp(-logp[64:-1].gather(-1, tokens[65:, None]).mean().item())
    recipe = {"name": "confident", "passes": [{"name": "fuse"}, {
        "name": "early_exit", "layers": [10, 20], "head": "distilled", "mode": "confident"}]}
    ppl, stats = confident_perplexity(model, tokens, recipe, 64, tokenizer)
    assert ppl / full - 1 <= CONFIDENT_BOUND, (ppl, full)
    assert stats.mean_layers < stats.num_layers
    torch._dynamo.reset()
