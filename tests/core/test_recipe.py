"""Recipes: every error case raises one clear RecipeError; dicts and TOML round-trip."""

import pytest
import torch

import llmcompile
from llmcompile import Recipe, RecipeError, UserRules, load_recipe
from llmcompile.backend import parse_options
from llmcompile.passes.fusion import FuseConfig

CUSTOM = llmcompile.RuleSet("custom", [
    llmcompile.Rule("exp_of_log", lambda x: torch.exp(torch.log(x)), lambda x: x * 1.0),
])


def test_default_preset_is_lossless_fusion():
    recipe = load_recipe("default")
    assert recipe.name == "default" and recipe.target == "inductor"
    assert [p.name for p in recipe.passes] == ["fuse"]
    assert load_recipe(None) == recipe


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown recipe preset 'nope'; presets: default"),
    ({"passes": [{"name": "fusee"}]},
     "unknown pass 'fusee'; valid passes: early_exit, fuse, quantize_weights, rules"),
    ({"passes": [{"name": "fuse", "includes": ["*"]}]}, "has no option(s) ['includes']"),
    ({"passes": [{"name": "fuse", "include": "rmsnorm"}]}, "fuse.include: expected a list"),
    ({"passes": [{"name": "fuse", "include": [3]}]}, "fuse.include[]: expected str"),
    ({"passes": [{"name": "fuse", "exclude": ["no_such_rule"]}]},
     "no rule in 'fusion' matches 'no_such_rule'"),
    ({"target": "tvm"}, "unknown target 'tvm'; valid targets: inductor"),
    ({"passes": ["fuse"]}, "passes[0] must be a table"),
    ({"pipeline": []}, "unknown recipe keys ['pipeline']"),
    ({"passes": [{"name": "rules", "ref": "no.such.module:RULES"}]}, "cannot import"),
    ({"passes": [{"name": "rules", "ref": "torch:nn"}]}, "is a module, not a RuleSet"),
    ({"passes": [{"name": "rules", "ref": "x:y", "at": "lowering"}]}, "not a rule phase"),
    (42, "must be a Recipe, dict, preset name or .toml path"),
    ("missing.toml", "does not exist"),
])
def test_bad_recipes_raise_one_clear_error(spec, message):
    with pytest.raises(RecipeError) as info:
        load_recipe(spec)
    assert message in str(info.value)


def test_backend_options_are_validated():
    with pytest.raises(RecipeError, match="unknown llmcompile option"):
        parse_options({"recipie": "default"})
    with pytest.raises(RecipeError, match="must be true or false"):
        parse_options({"fallback": "yes"})


def test_bad_recipe_raises_before_any_compilation():
    calls = []
    with pytest.raises(RecipeError, match="unknown pass"):
        llmcompile.compile(lambda x: calls.append(x) or x, {"passes": [{"name": "nope"}]})
    compiled = torch.compile(lambda x: x + 1, backend="llmcompile",
                             options={"recipe": {"passes": [{"name": "nope"}]}})
    with pytest.raises(Exception, match="unknown pass 'nope'"):
        compiled(torch.randn(3))
    assert not calls


def test_dict_and_toml_round_trip(tmp_path):
    recipe = Recipe((FuseConfig(exclude=("rmsnorm",)),
                     UserRules(ref="tests.core.test_recipe:CUSTOM", at="fuse")), name="mine")
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    text = recipe.to_toml()
    assert Recipe.from_toml(text) == recipe
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert load_recipe(str(path)) == recipe
    assert load_recipe(path) == recipe


def test_rules_given_as_objects_run_but_do_not_serialize():
    recipe = Recipe((UserRules(rules=CUSTOM),))
    assert recipe.passes[0].rules() is CUSTOM
    with pytest.raises(RecipeError, match="cannot be written out"):
        recipe.to_toml()


def test_malformed_toml():
    with pytest.raises(RecipeError, match="malformed"):
        Recipe.from_toml("name = \n[[passes]")


def test_configs_are_frozen_and_typed():
    config = FuseConfig(include=["rms*"])
    assert config.include == ("rms*",)
    with pytest.raises(Exception):  # noqa: B017 - dataclasses.FrozenInstanceError
        config.include = ("*",)
