"""sparse_attention: masks against a dense reference, numerics, layer selection, declines,
bad configs, and every tiny architecture against a dense-masked eager reference."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import llmcompile
from llmcompile import RecipeError, load_recipe, ops
from llmcompile.analysis.cost import window_break_even
from llmcompile.tools.cli import main
from llmcompile.tools.explain import explain
from llmcompile.tools.models import ARCHITECTURES, tiny_model

PROMPT = 12


def _reference_keep(s, t, window=0, sinks=0, block=0, local=0, stride=0):
    """Element by element, as the mask descriptions are documented."""
    keep = torch.zeros(s, t, dtype=torch.bool)
    for i, j in itertools.product(range(s), range(t)):
        q = i + t - s
        ok = j <= q
        if window:
            ok = ok and (q - j < window or j < sinks)
        if block:
            ok = ok and (q // block - j // block < local or (stride and (j // block + 1) %
                                                                 stride == 0))
        keep[i, j] = ok
    return keep


@pytest.mark.parametrize("s,t", [(6, 6), (1, 9), (3, 10), (8, 8)])
@pytest.mark.parametrize("spec", [dict(window=3), dict(window=3, sinks=2), dict(window=1, sinks=1),
                                  dict(block=2, local=2, stride=3), dict(block=4, local=1)])
def test_masks_equal_the_dense_reference(s, t, spec):
    want = _reference_keep(s, t, **spec)
    names = {"local": "local_blocks", "stride": "vertical_stride"}
    got = ops.attention_keep(s, t, **{names.get(k, k): v for k, v in spec.items()})
    assert torch.equal(got, want)


@pytest.mark.parametrize("s,t", [(5, 5), (1, 7), (3, 8)])
def test_numerics_match_a_masked_dense_sdpa(s, t):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, s, 8), torch.randn(2, 2, t, 8), torch.randn(2, 2, t, 8)
    keep = _reference_keep(s, t, window=3, sinks=1)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                          attn_mask=keep, scale=0.3)
    got = ops.attention(q, k, v, None, 0.3, True, 3, 1)
    torch.testing.assert_close(got, want)


def _recipe(target="eager", **sparse):
    return load_recipe({"name": "w", "target": target, "passes": [
        {"name": "fuse"}, {"name": "sparse_attention", "window": 4, "sink_tokens": 2,
                           **sparse}]})


def _masked_eager(model, ids, **spec):
    keep = ops.attention_keep(ids.shape[1], ids.shape[1], **spec)
    mask = torch.zeros(1, 1, *keep.shape).masked_fill(~keep, float("-inf"))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


def _compiled(model, recipe, ids):
    torch.compiler.reset()
    fn = torch.compile(model, backend="llmcompile", options={"recipe": recipe, "fallback": False},
                       fullgraph=True)
    with torch.no_grad():
        return fn(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_tiny_architecture_matches_a_dense_masked_reference(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    reports = explain(model, _recipe(), example_inputs={"input_ids": ids, "use_cache": False})
    layers = model.config.get_text_config().num_hidden_layers
    assert sum(r.fired("sliding_window_masked") + r.fired("sliding_window_causal")
               for r in reports) == layers
    torch.testing.assert_close(_compiled(model, _recipe(), ids),
                               _masked_eager(model, ids, window=4, sinks=2))


@pytest.mark.parametrize("unrepeat_kv", [True, False])
def test_inductor_matches_the_reference(unrepeat_kv):
    """Grouped K / V straight from the rotary (``unrepeat_kv``) once read wrongly by Inductor's
    CPU flex template (torch 2.13); the lowering makes them contiguous."""
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    recipe = load_recipe({"name": "w", "target": "inductor", "passes": [
        {"name": "fuse", "unrepeat_kv": unrepeat_kv},
        {"name": "sparse_attention", "window": 4, "sink_tokens": 2}]})
    torch.testing.assert_close(_compiled(model, recipe, ids),
                               _masked_eager(model, ids, window=4, sinks=2),
                               rtol=1e-4, atol=1e-4)


def test_block_sparse_matches_the_reference():
    model = tiny_model("qwen2")
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(2))
    recipe = _recipe(pattern="block_sparse", block=2, local_blocks=2, vertical_stride=3)
    torch.testing.assert_close(_compiled(model, recipe, ids),
                               _masked_eager(model, ids, block=2, local_blocks=2,
                                             vertical_stride=3))


def test_layers_selects_by_index_and_keeps_the_others_dense():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, PROMPT))
    (report,) = explain(model, _recipe(layers=[1]), example_inputs={"input_ids": ids,
                                                                    "use_cache": False})
    assert report.fired("sliding_window_masked") == 1
    assert any("layer 0 is not selected" in why
               for run in report.runs for why in run.stats.reasons("sliding_window_masked"))
    (report,) = explain(model, _recipe(layers="*[13579]"), example_inputs={
        "input_ids": ids, "use_cache": False})
    assert report.fired("sliding_window_masked") == 1


def test_a_model_with_a_smaller_window_keeps_its_own():
    model = tiny_model("mistral", sliding_window=3)
    ids = torch.randint(3, 200, (1, PROMPT))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(_compiled(model, _recipe(window=8), ids), want)


def test_declines_padding_masks_with_the_reason():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, PROMPT))
    padding = torch.ones(1, PROMPT, dtype=torch.long)
    (report,) = explain(model, _recipe(), example_inputs={"input_ids": ids, "use_cache": False,
                                                          "attention_mask": padding})
    reasons = [r for run in report.runs for r in run.stats.reasons("sliding_window_masked")]
    assert report.fired("sliding_window_masked") == 0
    assert any("reads the data of input" in r for r in reasons)


def test_declines_when_the_window_covers_every_key():
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, PROMPT))
    (report,) = explain(model, _recipe(window=64), example_inputs={"input_ids": ids,
                                                                   "use_cache": False})
    reasons = [r for run in report.runs for r in run.stats.reasons("sliding_window_masked")]
    assert any("covers all 12 keys" in r for r in reasons)
    notes = [n for run in report.runs for n in run.stats.notes]
    assert any(f"from {window_break_even(64, 2)} tokens" in n for n in notes)


def test_break_even_is_solved_from_the_tiles():
    # a window of 512 keys, unaligned, spans 5 tiles of 128; plus the sinks' tile: K = 6
    assert window_break_even(512, 4, 128) == 2 * 6 * 128 - 1
    assert window_break_even(100, 0, 128) == 2 * 2 * 128 - 1


@pytest.mark.parametrize("entry,fragment", [
    ({"window": 0}, "at least 1"),
    ({"sink_tokens": -1}, "0 or more"),
    ({"pattern": "strided"}, "'sliding_window', 'block_sparse'"),
    ({"pattern": "block_sparse", "block": 48}, "power of two"),
    ({"layers": "some"}, "'all', a list of layer indices"),
    ({"layers": [-1]}, "negative"),
])
def test_bad_configs_raise_before_compiling(entry, fragment):
    with pytest.raises(RecipeError, match=fragment):
        load_recipe({"passes": [{"name": "sparse_attention", **entry}]})


def test_a_layer_past_the_model_names_the_valid_layers():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match=r"\[5\] name no attention layer; valid: \[0, 1\]"):
        explain(model, _recipe(layers=[0, 5]), example_inputs={
            "input_ids": torch.randint(3, 200, (1, PROMPT)), "use_cache": False})


def test_window_preset(capsys):
    recipe = llmcompile.load_recipe("window")
    (sparse,) = [p for p in recipe.passes if p.name == "sparse_attention"]
    assert (sparse.window, sparse.sink_tokens, sparse.layers) == (512, 4, "all")
    assert recipe.lossy
    assert main(["recipes", "window"]) == 0
    assert 'name = "sparse_attention"' in capsys.readouterr().out


@pytest.mark.parametrize("sinks", [0, 2])
def test_onnx_export_with_a_window_matches_the_reference(tmp_path, sinks):
    """Window without sinks: GroupQueryAttention(local_window_size); with sinks: standard ops,
    said in the notes. Both pass onnx.checker (export checks) and match the masked reference,
    prefill and then a decode step over the cache."""
    pytest.importorskip("onnxruntime")
    import numpy as np

    from llmcompile.testing import onnx_op_counts

    model = tiny_model("llama")
    recipe = load_recipe({"name": "w", "target": "onnxruntime", "passes": [
        {"name": "fuse"}, {"name": "sparse_attention", "window": 4, "sink_tokens": sinks}]})
    result = llmcompile.export(model, tmp_path / "model.onnx", recipe)
    counts = onnx_op_counts(result.path)
    if sinks:
        assert "GroupQueryAttention" not in counts
        assert any("attention sinks" in n for n in result.notes)
    else:
        assert counts["GroupQueryAttention"] == 2
    lm = llmcompile.OnnxCausalLM(result.path)
    ids = torch.randint(3, 200, (1, PROMPT + 1), generator=torch.Generator().manual_seed(3))
    want = _masked_eager(model, ids, window=4, sinks=sinks)
    logits, past = lm.forward(ids[:, :PROMPT].numpy())
    np.testing.assert_allclose(logits, want[:, :PROMPT].numpy(), rtol=1e-4, atol=1e-4)
    logits, _ = lm.forward(ids[:, PROMPT:].numpy(), past)
    np.testing.assert_allclose(logits, want[:, PROMPT:].numpy(), rtol=1e-4, atol=1e-4)


def test_inductor_runs_flex_attention_with_one_block_mask(monkeypatch):
    """Static prefill: every layer's attention is FlexAttention, all sharing one BlockMask."""
    from llmcompile.lower import flex

    calls, masks = [], []
    real_flex, real_mask = flex.flex_attention, flex.block_mask
    monkeypatch.setattr(flex, "flex_attention", lambda *a, **k: calls.append(1) or real_flex(
        *a, **k))
    monkeypatch.setattr(flex, "block_mask", lambda *a: masks.append(1) or real_mask(*a))
    flex._BUILT.clear()
    model = tiny_model("llama")
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    # traced, not loaded from torch's caches (an earlier test may have compiled this graph)
    with torch._inductor.config.patch(force_disable_caches=True):
        got = _compiled(model, _recipe("inductor"), ids)
    torch.testing.assert_close(got, _masked_eager(model, ids, window=4, sinks=2),
                               rtol=1e-4, atol=1e-4)
    assert len(calls) >= 2 and len(masks) == 1  # 2 layers (traced), 1 mask built at compile


def test_growing_prompts_recompile_once_and_stay_right(monkeypatch):
    """After Dynamo's one dynamic recompile the symbolic-length graph still runs FlexAttention
    (its BlockMask from tile arithmetic), and nothing recompiles, across tile boundaries."""
    from torch._dynamo.utils import counters

    from llmcompile.lower import flex

    built = []
    real = flex.window_block_mask
    monkeypatch.setattr(flex, "window_block_mask", lambda *a: built.append(1) or real(*a))
    model = tiny_model("llama")
    torch.compiler.reset()
    fn = torch.compile(model, backend="llmcompile", options={
        "recipe": _recipe("inductor"), "fallback": False}, fullgraph=True)
    graphs = []
    for length in (12, 20, 33, 300, 9):
        ids = torch.randint(3, 200, (1, length))
        with torch.no_grad():
            out = fn(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, _masked_eager(model, ids, window=4, sinks=2),
                                   rtol=1e-4, atol=1e-4)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] > graphs[0] and graphs[-1] == graphs[1]  # one dynamic recompile
    assert built  # the dynamic graph's attention is FlexAttention
