"""Module paths come from the model's own tree, whatever way the model was compiled.

Skip globs (``quantize_weights.skip = ["lm_head"]``), layer selections and every path shown to
users read ``lm_head`` and ``model.layers.0.mlp.down_proj`` whether the user compiled the
module, its ``forward``, used ``llmcompile.compile``, Hugging Face ``generate``, or exported
with ``torch.export`` (``llmcompile.export``). Regression: transformers 5.24 wraps ``forward``
in a decorator taking ``*args``, and Dynamo's root became ``L['args'][0]``, which made
``skip = ["lm_head"]`` match nothing.
"""

import dataclasses
import fnmatch
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import llmcompile
from llmcompile import Recipe, Reject, Rule, RuleSet, UserRules
from llmcompile.core.program import module_path, source_root
from llmcompile.tools.models import tiny_model

PRESETS = ("default", "int8", "int4", "int4-rtn")
STYLES = ("module", "forward", "llmcompile.compile", "generate", "export")


class ByteTokenizer:
    """Calibration tokens for a 256-token tiny model: one token per byte."""

    def __call__(self, text, return_tensors="pt"):
        ids = torch.tensor([list(text.encode()[:20000])])
        return type("Encoded", (), {"input_ids": ids})()

    def save_pretrained(self, folder):  # llmcompile.export saves the tokenizer beside the file
        (Path(folder) / "byte_tokenizer.txt").write_text("one token per byte\n")


def _recording_recipe(preset: str, seen: set[str]) -> Recipe:
    """The preset plus a rule that records the module path of every linear and declines."""

    def record(m):
        seen.add(m.module_path)
        seen.add(m.weight_source("w").removesuffix(".weight"))
        return Reject("recording paths only")

    rules = RuleSet("record", [Rule("record_linear", lambda x, w: F.linear(x, w),
                                    lambda x, w: F.linear(x, w), check=record,
                                    example={"x": (2, 8), "w": (4, 8)})])
    recipe = llmcompile.load_recipe(preset)
    return dataclasses.replace(recipe, passes=(*recipe.passes, UserRules(rules=rules)),
                               target="eager")


def _run(style: str, model, recipe: Recipe, tmp_path) -> None:
    ids = torch.randint(3, 250, (1, 16), generator=torch.Generator().manual_seed(0))
    options = {"recipe": recipe, "fallback": False, "tokenizer": ByteTokenizer()}
    with torch.no_grad():
        if style == "module":
            torch.compile(model, backend="llmcompile", options=options)(input_ids=ids)
        elif style == "forward":
            torch.compile(model.forward, backend="llmcompile", options=options)(input_ids=ids)
        elif style == "llmcompile.compile":
            llmcompile.compile(model, recipe, tokenizer=ByteTokenizer())(input_ids=ids)
        elif style == "generate":
            model.forward = torch.compile(model.forward, backend="llmcompile", options=options)
            model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                           cache_implementation="static")
        else:
            llmcompile.export(model, tmp_path / "m.onnx",
                              dataclasses.replace(recipe, target="onnxruntime"),
                              tokenizer=ByteTokenizer())


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("style", STYLES)
def test_paths_are_the_models_own_for_every_entry_style(style, preset, tmp_path):
    model = tiny_model("llama")
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: set[str] = set()
    _run(style, model, _recording_recipe(preset, seen), tmp_path)
    assert {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"} <= seen
    # a fused Q/K/V or gate/up GEMM is traced in its layer's attention / MLP module
    parents = {name.rsplit(".", 1)[0] for name in linears}
    assert seen <= linears | parents, sorted(seen - linears - parents)
    if preset.startswith("int4"):  # skip = ["lm_head"] matched (or the recipe had raised)
        assert any(fnmatch.fnmatchcase(p, "lm_head") for p in seen)


@pytest.mark.parametrize(("raw", "roots", "want"), [
    ("L['self'].model.layers[0].mlp", (), "model.layers.0.mlp"),
    ("L['args'][0].model.layers.3.mlp", ("L['args'][0]",), "model.layers.3.mlp"),
    ("L['args'][0].lm_head", (), "lm_head"),
    ("G['model']._modules['lm_head']._parameters['weight']", ("G['model']",), "lm_head.weight"),
    ("L['fn'].__closure__[0].cell_contents._modules['lm_head']",
     ("L['fn'].__closure__[0].cell_contents",), "lm_head"),
    ("model.layers.0.self_attn", (), "model.layers.0.self_attn"),  # torch.export: already clean
])
def test_module_path_strips_whatever_root_dynamo_used(raw, roots, want):
    assert module_path(raw, roots) == want


def test_source_root_is_the_expression_before_the_module_tree():
    assert source_root("L['args'][0]._modules['model']._parameters['w']") == "L['args'][0]"
    assert source_root("L['kwargs']['input_ids']") is None
