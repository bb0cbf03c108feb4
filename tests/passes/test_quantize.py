"""Weight quantization: packing round trips, error bounds, rewrites, skip lists, config errors."""

import pytest
import torch

from llmcompile import Recipe, RecipeError, load_recipe, ops, quant
from llmcompile.passes.fusion import FuseConfig
from llmcompile.passes.quantize import QuantizeConfig
from llmcompile.tools.explain import explain


def test_int8_round_trip_and_error_bound():
    w = torch.randn(48, 64)
    q, s = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (48,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()
    x = torch.randn(3, 5, 64)
    want = x @ (q.float() * s[:, None]).T
    got = ops.int8_linear(x, q, s.to(torch.bfloat16))
    torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)  # bf16 activations


@pytest.mark.parametrize("group", [32, 64])
def test_int4_round_trip_packing_and_error_bound(group):
    w = torch.randn(48, 128)
    q4 = quant.quantize_int4(w, group)
    assert int(q4.q.max()) <= 15
    err = (q4.dequantize() - w).abs().view(48, -1, group)
    assert (err <= q4.scale[..., None] / 2 + 1e-5).all()
    packed, sz = q4.pack_cpu()
    x = torch.randn(2, 7, 128)
    torch.testing.assert_close(ops.int4_linear(x, packed, sz, group), x @ q4.dequantize().T,
                               rtol=2e-2, atol=0.2)  # bf16 activations and scales


def _outlier_problem():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    x = torch.randn(256, 128)
    x[:, :4] *= 30.0  # a few salient input channels, as in real LLM activations
    return w, x


def test_awq_never_worse_than_rtn_and_helps_on_outliers():
    w, x = _outlier_problem()
    rtn = (x @ (quant.dequantize_int4(w, 32) - w).T).pow(2).mean()
    s, clip = quant.awq_search(w, x.abs().mean(0), x, 32)
    awq = (x @ (quant.dequantize_int4(w * s, 32, clip) / s - w).T).pow(2).mean()
    assert awq < 0.8 * rtn


def test_gptq_error_feedback_beats_rtn():
    w, x = _outlier_problem()
    rtn = (x @ (quant.dequantize_int4(w, 32) - w).T).pow(2).mean()
    gptq = (x @ (quant.gptq_int4(w, x.T @ x, 32).dequantize() - w).T).pow(2).mean()
    assert gptq < 0.8 * rtn


def _counts(recipe):
    report = explain("llama", recipe)[0]
    return report.counts(), report


def test_int8_rewrites_every_linear_and_honours_skip():
    counts, report = _counts(load_recipe("int8"))
    # 2 layers x (qkv, o, gate_up, down) + lm_head
    assert counts["int8_linear"] == 9
    skip = Recipe((FuseConfig(), QuantizeConfig(bits=8, skip=("lm_head", "*.mlp.down_proj"))))
    counts, _ = _counts(skip)
    assert counts["int8_linear"] == 6


def test_only_gives_one_layer_its_own_bits():
    """int4 everywhere but the LM head, which a second entry quantizes to int8."""
    recipe = load_recipe({"passes": [
        {"name": "fuse"},
        {"name": "quantize_weights", "bits": 4, "method": "rtn", "skip": ["lm_head"]},
        {"name": "quantize_weights", "bits": 8, "only": ["lm_head"]}]})
    counts, _ = _counts(recipe)
    assert counts["int4_linear"] == 8 and counts["int8_linear"] == 1
    counts, _ = _counts(Recipe((FuseConfig(), QuantizeConfig(bits=8, only=("*.mlp.*",)))))
    assert counts["int8_linear"] == 4  # gate_up and down in each of 2 layers


def test_int4_rtn_rewrites_and_packs_once():
    counts, report = _counts(load_recipe("int4-rtn"))
    assert counts["int4_linear"] == 8  # lm_head skipped by the preset
    float_bytes = _counts(load_recipe("default"))[1].weight_bytes
    assert report.weight_bytes < 0.75 * float_bytes


@pytest.mark.parametrize("fields, message", [
    ({"bits": 3}, "choose one of 8, 4"),
    ({"bits": 4, "group_size": 48}, "choose one of 32, 64, 128"),
    ({"bits": 4, "method": "smart"}, "choose one of 'rtn', 'awq', 'gptq', 'awq+gptq'"),
    ({"bits": 8, "method": "awq"}, "applies to bits = 4"),
    ({"bits": 4, "calibration": {"samples": 0}}, "positive integer"),
    ({"bits": 4, "calibration": {"sample": 4}}, "unknown keys ['sample']"),
    ({"bits": 4, "skip": "lm_head"}, "expected a list"),
])
def test_config_errors_name_the_valid_choices(fields, message):
    with pytest.raises(RecipeError) as info:
        load_recipe({"passes": [{"name": "quantize_weights", **fields}]})
    assert message in str(info.value)


@pytest.mark.parametrize("fields, message", [
    ({"bits": 4, "group_size": 128}, "does not divide the input width 64"),
    ({"bits": 8, "skip": ["decoder.*"]}, "matches no linear layer"),
    ({"bits": 8, "only": ["decoder.*"]}, "quantize_weights.only: 'decoder.*' matches no"),
    ({"bits": 4, "method": "awq"}, "needs a tokenizer"),
])
def test_model_dependent_errors_raise_before_compiling(fields, message):
    model = __import__("llmcompile.tools.models", fromlist=["tiny_model"]).tiny_model("llama")
    fn = torch.compile(model.forward, backend="llmcompile",
                       options={"recipe": {"passes": [{"name": "quantize_weights", **fields}]}})
    with pytest.raises(Exception, match=message):
        fn(input_ids=torch.randint(0, 256, (1, 20)))


def test_quantized_tiny_llama_stays_close_to_float():
    from llmcompile.tools.models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(0, 256, (1, 24))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        for recipe, tol in (("int8", 0.02), ("int4-rtn", 0.2)):
            torch._dynamo.reset()
            fn = torch.compile(model.forward, backend="llmcompile",
                               options={"recipe": recipe, "fallback": False})
            got = fn(input_ids=ids).logits
            assert (got - want).abs().max() < tol * want.abs().max(), recipe


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3", "gemma", "gpt2", "gptj"])
@pytest.mark.parametrize("recipe", ["int8", "int4-rtn"])
def test_quantized_recipes_work_across_the_zoo(arch, recipe):
    import dataclasses

    from llmcompile.backend import collect_reports
    from llmcompile.tools.models import tiny_model

    model = tiny_model(arch)
    ids = torch.randint(0, 256, (1, 16))
    eager_recipe = dataclasses.replace(load_recipe(recipe), target="eager")  # no Inductor time
    fn = torch.compile(model.forward, backend="llmcompile",
                       options={"recipe": eager_recipe, "fallback": False})
    with torch.no_grad(), collect_reports() as reports:
        got = fn(input_ids=ids, use_cache=False).logits
        want = model(input_ids=ids, use_cache=False).logits
    fired = sum(n for name, n in reports[0].counts().items() if "_linear" in name)
    # GPT-2's Conv1D projections are addmm, not linear: only its LM head is a linear, and the
    # int4 presets keep the LM head in float
    assert fired >= (0 if (arch, recipe) == ("gpt2", "int4-rtn") else 1)
    tol = 0.05 if recipe == "int8" else 0.3
    assert (got - want).abs().max() < tol * want.abs().max()


def test_too_short_calibration_text_is_a_clear_error(tmp_path):
    from llmcompile.quant.calibrate import CalibrationError, calibration_tokens

    short = tmp_path / "short.txt"
    short.write_text("Only a few words here.")

    class Tok:
        def __call__(self, text, return_tensors=None):
            return type("E", (), {"input_ids": torch.arange(len(text.split()))[None]})()

    with pytest.raises(CalibrationError, match="tokens, 4096 needed"):
        calibration_tokens(Tok(), short, 4096)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibration_tokens(Tok(), tmp_path / "missing.txt", 10)


def test_packed_kernel_choice_checks_the_cpu(monkeypatch):
    from llmcompile.ops import cpu

    monkeypatch.delenv("LLMCOMPILE_PACKED_DTYPE", raising=False)
    assert cpu.packed_activation_dtype() == torch.bfloat16  # fastest on AVX2 and AVX-512
    assert cpu.packed_kernels_pay("AVX2") and cpu.packed_kernels_pay("AVX512")
    assert not cpu.packed_kernels_pay("DEFAULT")
    assert cpu.capability() in cpu.describe()
    monkeypatch.setenv("LLMCOMPILE_PACKED_DTYPE", "float32")
    assert cpu.packed_activation_dtype() == torch.float32
    monkeypatch.setenv("LLMCOMPILE_PACKED_DTYPE", "int8")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu.packed_activation_dtype()


def test_without_vector_kernels_the_packed_rewrite_declines(monkeypatch):
    from llmcompile.ops import cpu

    monkeypatch.setattr(cpu, "capability", lambda: "DEFAULT")
    reports = explain("llama", "int8")
    assert reports[0].fired("int8_linear") == 0
    assert any("vector kernels" in r for run in reports[0].runs
               for r in run.stats.reasons("int8_linear"))


def test_float32_activation_path_of_the_packed_kernels_is_exact_to_its_dequantized_weight():
    w, x = torch.randn(48, 128), torch.randn(3, 5, 128)
    q, s = quant.quantize_int8(w)
    torch.testing.assert_close(ops.int8_linear(x, q, s.float()), x @ (q.float() * s[:, None]).T,
                               rtol=1e-4, atol=1e-4)
    q4 = quant.quantize_int4(w, 64)
    packed, sz = q4.pack_cpu(torch.float32)
    assert sz.dtype == torch.float32
    torch.testing.assert_close(ops.int4_linear(x, packed, sz, 64), x @ q4.dequantize().T,
                               rtol=1e-4, atol=1e-3)


class _ByteTokenizer:
    def __call__(self, text, return_tensors=None):
        return type("Encoded", (), {"input_ids": torch.tensor([list(text.encode())[:4096]])})()


@pytest.mark.parametrize("compile_what", ["module", "forward"])
def test_calibrated_quantization_under_plain_torch_compile(compile_what, tmp_path, monkeypatch):
    """torch.compile(model or model.forward, backend="llmcompile") with a calibrated recipe:
    the model is found from Dynamo's frame, calibrated on the text (not the call), and a
    1-token first call works."""
    from llmcompile.backend import collect_reports
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))
    model = tiny_model("llama")
    recipe = {"target": "eager", "passes": [{"name": "quantize_weights", "bits": 4,
              "group_size": 64, "method": "awq",
              "calibration": {"samples": 2, "seq_len": 64}}]}
    target = model if compile_what == "module" else model.forward
    fn = torch.compile(target, backend="llmcompile",
                       options={"recipe": recipe, "tokenizer": _ByteTokenizer(),
                                "fallback": False})
    with collect_reports() as reports, torch.no_grad():
        out = fn(input_ids=torch.tensor([[5]]), use_cache=False).logits
        ref = model(input_ids=torch.tensor([[5]]), use_cache=False).logits
    assert reports and reports[0].fired("int4_linear") == 15  # 2 layers x 7 linears + head
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()  # int4-rtn's bound above


def test_each_entry_calibrates_on_its_own_settings(tmp_path, monkeypatch):
    """Two quantize_weights entries with different calibration settings: the second uses its
    own tokens, so its layer is the one a recipe of that entry alone solves."""
    from llmcompile.core import stages
    from llmcompile.tools.models import tiny_model

    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))
    head = {"name": "quantize_weights", "bits": 4, "group_size": 64, "method": "awq",
            "seed": 7,  # no other test's layers (this process keeps solved layers by key)
            "only": ["lm_head"], "calibration": {"samples": 2, "seq_len": 32}}
    body = {**head, "only": [], "skip": ["lm_head"], "calibration": {"samples": 2,
                                                                      "seq_len": 64}}
    model = tiny_model("llama")

    def solved(passes) -> int:
        torch._dynamo.reset()
        before = stages.table().get("quant layers solved", {}).get("count", 0)
        fn = torch.compile(model, backend="llmcompile", options={
            "recipe": {"target": "eager", "passes": passes}, "tokenizer": _ByteTokenizer(),
            "fallback": False})
        with torch.no_grad():
            fn(input_ids=torch.tensor([[5, 6, 7]]), use_cache=False)
        return stages.table().get("quant layers solved", {}).get("count", 0) - before

    assert solved([body, head]) == 15  # 2 layers x 7 linears + the head
    assert solved([head]) == 0  # the head as the two-entry recipe solved it
