"""Tiny real architectures through ``backend="llmcompile"`` with the default (fusion) recipe:
logits match eager, and each fusion fires the expected number of times."""

import pytest
import torch
from transformers import GPTJForCausalLM

from llmcompile.backend import collect_reports
from llmcompile.tools.models import tiny_model

OPTIONS = {"recipe": "default", "fallback": False}

# Rules fired in a whole tiny model: 2 decoder layers, then the final norm. Per layer: one
# attention, two norms, rotary on q and k, one Q/K/V and one gate/up GEMM, one gated
# activation; the final norm makes 5 norms, and every norm but the first reads a residual sum.
# Their attention is grouped (fewer KV heads): it takes the KV heads, repeat_kv's copies dropped.
LLAMA = {"sdpa_masked": 2, "attention_unrepeat_kv_masked": 2, "rmsnorm": 5, "add_rmsnorm": 4,
         "rotary": 4, "qkv_projection": 2, "gate_up_projection": 2, "silu_mul": 2}
EXPECTED = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": {**LLAMA, "qkv_projection": 0, "qkv_projection_bias": 2},
    # Phi-3 already has qkv_proj and gate_up_proj; its chunked gate/up still fuses into silu_mul
    "phi3": {**LLAMA, "qkv_projection": 0, "gate_up_projection": 0,
             "attention_unrepeat_kv_masked": 0},  # (its tiny config is not grouped)
    # Gemma: (1 + w) norms, gelu-tanh MLP
    "gemma": {**LLAMA, "rmsnorm": 0, "rmsnorm_offset": 5, "silu_mul": 0, "gelu_tanh_mul": 2},
    "gpt2": {"sdpa_masked": 2},  # Conv1D projections are addmm; layer norms are aten ops
    "gpt2-eager": {"attention_mul_masked": 2},
    # GPT-J: interleaved rotary declines (rotary_interleaved); fc_in has a bias, q/k/v none.
    # Its attention follows the installed transformers: SDPA through the attention interface
    # (5.24+), or computed by hand (divided by sqrt(d)) before.
    "gptj": {"sdpa_masked" if GPTJForCausalLM._supports_sdpa else "attention_div_masked": 2,
             "qkv_projection": 2},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "ind"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(arch: str):
    if arch == "gpt2-eager":
        return tiny_model("gpt2", attn_implementation="eager")
    return tiny_model(arch)


def _compile_and_compare(model, tol: float):
    """Compile ``model.forward`` fullgraph, compare logits with eager; returns the reports."""
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model.forward, backend="llmcompile", fullgraph=True,
                             options=OPTIONS)
    with torch.no_grad(), collect_reports() as reports:
        got = compiled(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    return reports


@pytest.mark.parametrize("arch", list(EXPECTED))
def test_tiny_model_fuses_and_matches_eager(arch):
    reports = _compile_and_compare(_model(arch), 1e-4)
    assert len(reports) == 1
    fired = {name: n for name, n in reports[0].counts().items() if n}
    assert fired == {k: v for k, v in EXPECTED[arch].items() if v}, reports[0].format()


def test_static_cache_generation_matches_eager():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static",
                  pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, **kwargs)
        model.forward = torch.compile(model.forward, backend="llmcompile", fullgraph=True,
                                      options=OPTIONS)
        with collect_reports() as reports:
            got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)
    assert reports and all(r.fired("rmsnorm") == 5 for r in reports)


def test_bf16_llama_fuses_half_precision_norms():
    reports = _compile_and_compare(tiny_model("llama").to(torch.bfloat16), 3e-2)
    fired = {name: n for name, n in reports[0].counts().items() if n}
    assert fired == {**{k: v for k, v in LLAMA.items() if k != "rmsnorm"}, "rmsnorm_bf16": 5}
