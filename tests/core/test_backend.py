"""backend="llmcompile": entry point, correctness, dynamic shapes, fallback, Inductor passes."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch

import llmcompile
import llmcompile.backend
from llmcompile import Recipe, Rule, RuleSet, UserRules
from llmcompile._compat import CustomGraphPass, inductor_config
from llmcompile.backend import collect_reports
from llmcompile.core import verify as verify_module
from llmcompile.core.verify import VerificationError
from llmcompile.lower.inductor import PostGradRules
from llmcompile.tools.models import tiny_model


def test_entry_point_works_in_a_fresh_interpreter_without_import():
    code = textwrap.dedent("""
        import sys, torch
        f = torch.compile(lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x,
                          backend="llmcompile", options={"recipe": "default"})
        x = torch.randn(3, 8)
        assert torch.allclose(f(x), torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * x)
        assert "llmcompile.backend" in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


def test_tiny_llama_fullgraph_matches_eager_and_does_not_recompile():
    model = tiny_model("llama")
    counter = torch._dynamo.testing.CompileCounterWithBackend("llmcompile")
    compiled = torch.compile(model.forward, backend=counter, fullgraph=True)
    with torch.no_grad(), collect_reports() as reports:
        for length in (7, 16, 33, 100):
            ids = torch.randint(0, 256, (1, length))
            got = compiled(input_ids=ids, use_cache=False).logits
            want = model(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # one static compile for 7, one dynamic recompile for 16; 33 and 100 reuse it
    assert counter.frame_count == 2
    assert reports and all(r.fired("rmsnorm") == 5 for r in reports)


def test_mode_is_honoured():
    model = tiny_model("llama")
    compiled = torch.compile(model.forward, backend="llmcompile", mode="max-autotune-no-cudagraphs")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def broken_replacement(x):
    raise RuntimeError("this rule is broken on purpose")


BROKEN = RuleSet("broken", [Rule("broken", lambda x: torch.sin(x), broken_replacement)])


def test_unhandled_graph_falls_back_to_inductor_with_one_warning(caplog):
    recipe = Recipe((UserRules(rules=BROKEN),), name="broken")
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="llmcompile",
                       options={"recipe": recipe})
    x = torch.randn(4)
    with caplog.at_level(logging.WARNING, logger="llmcompile"):
        torch.testing.assert_close(fn(x), torch.sin(x) * 2)
    warnings = [r for r in caplog.records if "runs on plain Inductor instead" in r.message]
    assert len(warnings) == 1 and "broken on purpose" in warnings[0].message
    assert "recipe 'broken' failed" in warnings[0].message


def test_fallback_can_be_turned_off():
    recipe = Recipe((UserRules(rules=BROKEN),), name="broken")
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="llmcompile",
                       options={"recipe": recipe, "fallback": False})
    with pytest.raises(Exception, match="broken on purpose"):
        fn(torch.randn(4))


class CountingPass(CustomGraphPass):
    calls = 0

    def __call__(self, graph):
        CountingPass.calls += 1

    def uuid(self):
        return b"counting-pass-v1"


def exp_pattern(x):
    return torch.exp(x) * 2


def exp_replacement(x):
    return torch.exp(x + 0.6931471805599453)


def test_post_grad_rules_chain_with_an_installed_pass_and_keep_the_cache_key():
    rules = RuleSet("pg", [Rule("exp2", exp_pattern, exp_replacement)])
    recipe = Recipe((UserRules(rules=rules, at="post_grad"),), name="pg")
    before = inductor_config.post_grad_custom_post_pass
    CountingPass.calls = 0
    with inductor_config.patch(post_grad_custom_post_pass=CountingPass(),
                               fx_graph_cache=False):
        fn = torch.compile(lambda x: torch.exp(x) * 2, backend="llmcompile",
                           options={"recipe": recipe, "fallback": False})
        x = torch.randn(8)
        torch.testing.assert_close(fn(x), torch.exp(x) * 2)
    assert CountingPass.calls == 1  # the other library's pass still ran
    assert inductor_config.post_grad_custom_post_pass is before  # nothing overwritten globally

    a = PostGradRules(rules, "recipe-a", CountingPass())
    assert a.uuid() == PostGradRules(rules, "recipe-a", CountingPass()).uuid()
    assert a.uuid() != PostGradRules(rules, "recipe-b", CountingPass()).uuid()
    other = RuleSet("pg", [Rule("exp2", exp_pattern, lambda x: torch.exp(x) * 2.0 + 0)])
    assert a.uuid() != PostGradRules(other, "recipe-a", CountingPass()).uuid()


def test_compile_facade_validates_then_compiles():
    fn = llmcompile.compile(lambda x: torch.relu(x) + 1, "default")
    x = torch.randn(5)
    torch.testing.assert_close(fn(x), torch.relu(x) + 1)


# --- verify: a wrong rewrite never goes unnoticed ------------------------------------------

def drop_residual_pattern(x, residual):
    return x + residual


def drop_residual_replacement(x, residual):
    return x  # wrong on purpose: the residual is lost


DROP_RESIDUAL = RuleSet("wrong", [Rule("drop_residual", drop_residual_pattern,
                                       drop_residual_replacement)])


def test_verify_catches_a_rule_that_drops_a_residual_add():
    model = tiny_model("llama")
    recipe = Recipe((UserRules(rules=DROP_RESIDUAL),), name="wrong")
    ids = torch.randint(3, 250, (1, 8))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        silent = torch.compile(model.forward, backend="llmcompile",
                               options={"recipe": recipe, "target": "eager"})
        assert not torch.allclose(silent(input_ids=ids, use_cache=False).logits, want,
                                  atol=1e-2)  # without verify the wrong numbers go through
        torch._dynamo.reset()
        checked = torch.compile(model.forward, backend="llmcompile",
                                options={"recipe": recipe, "target": "eager", "verify": True})
        with pytest.raises(VerificationError, match="differs from the uncompiled graph by"):
            checked(input_ids=ids, use_cache=False)


@pytest.mark.parametrize("recipe", ["default", "int8"])
def test_verify_accepts_correct_recipes_and_checks_only_the_first_call(recipe, monkeypatch):
    model = tiny_model("llama")
    compiled = torch.compile(model.forward, backend="llmcompile",
                             options={"recipe": recipe, "verify": True, "fallback": False})
    ids = torch.randint(3, 250, (1, 8))
    calls = []
    real = verify_module.check
    monkeypatch.setattr(verify_module, "check", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        for _ in range(3):
            compiled(input_ids=ids, use_cache=False)
    assert calls == [1]


def test_verify_compares_a_static_cache_written_in_place():
    from transformers import StaticCache

    from llmcompile._compat import cache_kwarg

    model = tiny_model("llama")
    compiled = torch.compile(model.forward, backend="llmcompile",
                             options={"verify": True, "fallback": False})
    cache = StaticCache(config=model.config, max_cache_len=16)
    ids = torch.randint(3, 250, (1, 8))
    with torch.no_grad():
        got = compiled(input_ids=ids, cache_position=torch.arange(8), use_cache=True,
                       **{cache_kwarg(model): cache}).logits
    torch.testing.assert_close(got, model(input_ids=ids, use_cache=False).logits,
                               rtol=1e-4, atol=1e-4)
    assert cache.layers[0].keys[:, :, :8].abs().sum() > 0  # written once, by the compiled run


def test_bad_verify_and_fallback_options_raise():
    with pytest.raises(llmcompile.RecipeError, match="'verify' must be true or false"):
        llmcompile.backend.parse_options({"verify": "yes"})
    assert llmcompile.backend.parse_options({"fallback": "error"})[1]["fallback"] is False
    with pytest.raises(llmcompile.RecipeError, match="'cpp_wrapper' must be true or false"):
        llmcompile.backend.parse_options({"cpp_wrapper": 1})
    assert llmcompile.backend.parse_options({})[1]["cpp_wrapper"] is False


def test_fallback_error_raises():
    recipe = Recipe((UserRules(rules=BROKEN),), name="broken")
    fn = torch.compile(lambda x: torch.sin(x) * 2, backend="llmcompile",
                       options={"recipe": recipe, "fallback": "error"})
    with pytest.raises(Exception, match="broken on purpose"):
        fn(torch.randn(4))
