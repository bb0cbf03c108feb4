"""ONNX export of an early-exit recipe: the full (verify) file and a draft file (first ``L``
layers + the model's own norm and LM head) sharing one external data file, and
``OnnxCausalLM``'s self-speculative decoding over them giving plain greedy's tokens."""

import json

import numpy as np
import onnx
import pytest
import torch

from llmcompile import OnnxCausalLM, export, load_recipe
from llmcompile.core.recipe import RecipeError
from llmcompile.tools.models import greedy_generate, tiny_model

pytest.importorskip("onnxruntime")

CPU = "CPUExecutionProvider"


def _recipe(layer: int, draft_tokens: int, **exit_options):
    return load_recipe({"name": "ee", "passes": [
        {"name": "fuse"},
        {"name": "early_exit", "layers": [layer], "draft_tokens": draft_tokens,
         **exit_options}]})


@pytest.fixture(scope="module")
def exit_after_1(tmp_path_factory):
    """Exit after layer 0 of 4, 3 drafts; the later layers are damped so that the draft is
    right about 80% of the time (some drafts accepted, some rejected)."""
    model = tiny_model("llama", num_hidden_layers=4)
    with torch.no_grad():
        for layer in model.model.layers[1:]:
            layer.self_attn.o_proj.weight.mul_(0.2)
            layer.mlp.down_proj.weight.mul_(0.2)
    result = export(model, tmp_path_factory.mktemp("ee1") / "model.onnx", _recipe(1, 3))
    return model, result, None


@pytest.fixture(scope="module")
def exit_after_2(tmp_path_factory):
    """Exit after layers 0..1 of 4 with a distilled (here: random) low-rank adapter, 1 draft:
    the adapter exists in the draft alone, so it gets a small data file of its own."""
    model = tiny_model("llama", num_hidden_layers=4, seed=3)
    folder = tmp_path_factory.mktemp("ee2")
    generator = torch.Generator().manual_seed(0)
    adapter = {"down": torch.randn(64, 16, generator=generator) * 0.1,
               "up": torch.randn(16, 64, generator=generator) * 0.1}
    torch.save(adapter, folder / "adapter.pt")
    recipe = _recipe(2, 1, head="distilled", adapter=str(folder / "adapter.pt"))
    return model, export(model, folder / "model.onnx", recipe), adapter


FILES = ["exit_after_1", "exit_after_2"]


def _draft_reference(model, ids, layer: int, adapter=None) -> np.ndarray:
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states[layer]
        if adapter is not None:
            hidden = hidden + (hidden @ adapter["down"]) @ adapter["up"]
        return model.lm_head(model.model.norm(hidden)).numpy()


def _external(path):
    model = onnx.load(str(path), load_external_data=False)
    external = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    embedded = sum(len(t.raw_data) for t in model.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL)
    return model, external, embedded


@pytest.mark.parametrize("fixture", FILES)
def test_draft_and_full_files_share_one_set_of_weights(fixture, request):
    model, result, adapter = request.getfixturevalue(fixture)
    full, draft = result.path, result.draft
    layer = result.sidecar["draft"]["exit_layer"]
    assert draft == full.with_name("model.draft.onnx") and draft.is_file()
    for path in (full, draft):
        onnx.checker.check_model(str(path), full_check=True)
    sidecar = json.loads(full.with_name("model.llmcompile.json").read_text())
    assert sidecar["draft"]["file"] == "model.draft.onnx"
    assert sidecar["draft"]["draft_tokens"] == (3 if layer == 1 else 1)
    assert sidecar["layers"] == 4 and sidecar["draft"]["layers"] == layer

    graph, external, embedded = _external(draft)
    assert [i.name for i in graph.graph.input] == sidecar["draft"]["inputs"]
    assert [o.name for o in graph.graph.output] == sidecar["draft"]["outputs"]
    assert sidecar["draft"]["inputs"][2:] == [f"past_key_values.{i}.{kv}" for i in range(layer)
                                             for kv in ("key", "value")]
    full_data = full.with_name("model.onnx.data").stat().st_size
    shared = sum(int(e["length"]) for e in external if e["location"] == "model.onnx.data")
    assert shared > 0.3 * full_data  # embedding, LM head, the first layers: the full's bytes
    own = draft.with_name("model.draft.onnx.data")
    if adapter is None:
        assert not own.exists()
        assert {e["location"] for e in external} == {"model.onnx.data"}
    else:  # the adapter only: two [64, 16] float32 matrices
        assert {e["location"] for e in external} == {"model.onnx.data", own.name}
        assert 2 * 64 * 16 * 4 <= own.stat().st_size <= 2 * 64 * 16 * 4 + 128
    # what the draft adds in weights: small embedded vectors (norms) and its own data only
    added = embedded + (own.stat().st_size if own.exists() else 0)
    assert added < 0.02 * full_data
    assert result.draft_bytes == draft.stat().st_size + (own.stat().st_size
                                                         if own.exists() else 0)


@pytest.mark.parametrize("fixture", FILES)
def test_draft_file_computes_the_exit_head_on_layer_l(fixture, request):
    model, result, adapter = request.getfixturevalue(fixture)
    layer = result.sidecar["draft"]["exit_layer"]
    lm = OnnxCausalLM(result.path, provider=CPU)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    # (GroupQueryAttention takes several new tokens after a past in a batch of 1 only)
    nxt = torch.randint(3, 256, (2, 1), generator=torch.Generator().manual_seed(6))
    names = lm.draft_meta["inputs"]
    empty = [np.zeros((2, 2, 0, 16), np.float32) for _ in range(2 * layer)]
    prefill, past = lm._run(lm.draft, names, ids.numpy(), empty)
    step, present = lm._run(lm.draft, names, nxt.numpy(), past)
    expected = _draft_reference(model, torch.cat([ids, nxt], 1), layer, adapter)
    np.testing.assert_allclose(prefill, expected[:, :7], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(step, expected[:, 7:], atol=1e-4, rtol=1e-4)
    assert len(present) == 2 * layer and present[0].shape == (2, 2, 8, 16)
    # the draft's cache of its layers is the full model's cache of those layers
    _, full_past = lm.forward(ids.numpy())
    for mine, full in zip(past, full_past):
        np.testing.assert_allclose(mine, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fixture", FILES)
def test_speculative_generation_is_plain_greedy(fixture, request):
    model, result, _ = request.getfixturevalue(fixture)
    spec = OnnxCausalLM(result.path, provider=CPU)
    plain = OnnxCausalLM(result.path, provider=CPU, speculative=False)
    assert spec.draft is not None and plain.draft is None
    accepted = 0
    for seed in range(3):
        ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(seed))
        expected = greedy_generate(model, model.forward, ids, 20)
        assert plain.generate(ids[0].tolist(), 20, eos_token_id=-1) == expected
        assert plain.last_stats.mode == "greedy" and plain.last_stats.verifications == 0
        assert spec.generate(ids[0].tolist(), 20, eos_token_id=-1) == expected
        stats = spec.last_stats
        assert stats.mode == "speculative" and stats.new_tokens == 20
        # each verification keeps its accepted drafts and one token of the full model's
        assert stats.new_tokens == 1 + stats.verifications + stats.accepted
        assert stats.drafted <= spec.draft_tokens * stats.verifications
        accepted += stats.accepted
    if fixture == "exit_after_1":
        assert accepted > 10  # the damped model's draft is often right
    for budget in (1, 2, 5):  # the budget cuts a block short
        assert spec.generate(ids[0].tolist(), budget, eos_token_id=-1) == expected[:budget]


def test_eos_inside_an_accepted_draft_block_stops_there(exit_after_1):
    model, result, _ = exit_after_1
    spec = OnnxCausalLM(result.path, provider=CPU)
    plain = OnnxCausalLM(result.path, provider=CPU, speculative=False)
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    prompt = ids[0].tolist()
    greedy = plain.generate(prompt, 24, eos_token_id=-1)
    cut_blocks = 0
    for position in range(4, 16):
        eos = greedy[position]
        if eos in greedy[:position]:
            continue  # the first occurrence stops greedy decoding
        expected = plain.generate(prompt, 24, eos_token_id=eos)
        assert expected == greedy[:position + 1]
        assert spec.generate(prompt, 24, eos_token_id=eos) == expected
        stats = spec.last_stats
        # tokens a block would have added past the EOS are dropped
        cut_blocks += stats.new_tokens < 1 + stats.verifications + stats.accepted
    assert cut_blocks > 0


def test_non_early_exit_export_has_no_draft(tmp_path):
    result = export(tiny_model("llama"), tmp_path / "model.onnx")
    assert result.draft is None and result.draft_bytes == 0
    assert "draft" not in result.sidecar
    assert sorted(p.name for p in tmp_path.glob("model*")) == [
        "model.llmcompile.json", "model.onnx", "model.onnx.data"]
    lm = OnnxCausalLM(result.path, provider=CPU)
    assert lm.draft is None
    lm.generate([5, 6, 7], 4, eos_token_id=-1)
    assert lm.last_stats.mode == "greedy" and lm.last_stats.new_tokens == 4


def test_confident_mode_is_refused(tmp_path):
    with pytest.raises(RecipeError, match="speculative"):
        export(tiny_model("llama", num_hidden_layers=4), tmp_path / "model.onnx",
               _recipe(1, 2, mode="confident"))


def test_a_distilled_draft_without_adapter_or_tokenizer_is_a_clear_error(tmp_path,
                                                                          monkeypatch):
    # no adapter file yet: export trains it on first use, as llmcompile.generate does, which
    # needs the model's tokenizer for the calibration text
    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))  # an empty adapter cache
    model = tiny_model("llama", num_hidden_layers=4)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        export(model, tmp_path / "model.onnx", _recipe(2, 1, head="distilled"))
    assert not (tmp_path / "model.onnx").exists()
