"""early_exit: bad configs, the draft graph against an eager truncated model, CALM's KV
filling against an eager reference, the full graph left unchanged, every tiny architecture."""

from __future__ import annotations

import pytest
import torch

import llmcompile
from llmcompile import RecipeError, load_recipe
from llmcompile.tools.bench_runner import new_cache
from llmcompile.tools.models import ARCHITECTURES, tiny_model

PROMPT = 6


def _recipe(graph="draft", target="eager", **exit_options):
    return load_recipe({"name": "ee", "target": target, "passes": [
        {"name": "fuse"}, {"name": "early_exit", "graph": graph, **exit_options}]})


@pytest.mark.parametrize("options,message", [
    (dict(layers=[0]), "at least one layer"),
    (dict(layers=[]), "at least one layer"),
    (dict(layers=[3, 2]), "increasing"),
    (dict(draft_tokens=0), "draft at least 1"),
    (dict(threshold=1.0), "strictly between 0 and 1"),
    (dict(threshold=0.0), "strictly between 0 and 1"),
    (dict(mode="fast"), "mode"),
    (dict(head="big"), "head"),
    (dict(rank=0), "rank"),
])
def test_bad_configs_raise_before_compiling(options, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe({"passes": [{"name": "early_exit", **options}]})


def test_a_layer_past_the_model_raises_before_compiling():
    model = tiny_model("llama")
    with pytest.raises(RecipeError, match="past the model"):
        llmcompile.generate(model, torch.tensor([[5, 6]]), _recipe(layers=[2]))


def _step(model, recipe, cache, ids, start):
    fn = torch.compile(model.forward, backend="llmcompile",
                       options={"recipe": recipe, "fallback": False})
    return fn(input_ids=ids, cache=cache, cache_position=torch.arange(start, start + ids.shape[1]),
              use_cache=True).logits


def _prefilled(model, ids):
    cache = new_cache(model, 16, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        _step(model, _recipe("full", layers=[1]), cache, ids, 0)
    return cache


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_draft_graph_is_the_first_layers_then_the_shared_head(layers):
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    cache = _prefilled(model, ids)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    with torch.no_grad():
        got = _step(model, _recipe(layers=[layers]), cache, torch.tensor([[7]]), PROMPT)
        hidden = model(torch.cat([ids, torch.tensor([[7]])], 1),
                       output_hidden_states=True).hidden_states[layers]
        want = model.lm_head(model.model.norm(hidden))[:, -1]
    torch.testing.assert_close(got[:, -1], want)
    for i, (layer, (keys, values)) in enumerate(zip(cache.layers, before)):
        changed = not torch.equal(layer.keys[:, :, PROMPT], keys[:, :, PROMPT])
        assert changed == (i < layers), f"layer {i}: the draft wrote its cache: {changed}"
        assert torch.equal(layer.values[:, :, :PROMPT], values[:, :, :PROMPT])


def test_confident_exit_fills_later_layers_kv_from_the_exit_hidden_state():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 256, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    cache = _prefilled(model, ids)
    with torch.no_grad():
        _step(model, _recipe(layers=[2], mode="confident"), cache, torch.tensor([[7]]), PROMPT)
        # eager CALM reference: layers 2 and 3 see the hidden state leaving layer 1
        ref = _prefilled(model, ids)
        full = torch.cat([ids, torch.tensor([[7]])], 1)
        hidden = model(full, output_hidden_states=True).hidden_states[2][:, -1:]
        pos = torch.tensor([PROMPT])
        cos_sin = model.model.rotary_emb(hidden, pos[None])
        for j, layer in enumerate(model.model.layers):
            if j < 2:
                continue
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            k = attn.k_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            _, k = apply_rotary_pos_emb(k, k, *cos_sin)
            ref.layers[j].keys[:, :, PROMPT] = k[:, :, 0]
            ref.layers[j].values[:, :, PROMPT] = v[:, :, 0]
    for j in (2, 3):
        torch.testing.assert_close(cache.layers[j].keys[:, :, PROMPT],
                                   ref.layers[j].keys[:, :, PROMPT])
        torch.testing.assert_close(cache.layers[j].values[:, :, PROMPT],
                                   ref.layers[j].values[:, :, PROMPT])


def test_full_graph_is_unchanged_and_reports_the_draft_share():
    reports = llmcompile.explain(tiny_model("llama", num_hidden_layers=4),
                                 _recipe("full", layers=[1]))
    run = next(r for r in reports[0].runs if r.name == "early_exit")
    assert run.stats.fired("early_exit") == 0
    assert any("exit after 1 of 4 layers" in note for note in run.stats.notes)
    assert not _recipe("full").lossy and _recipe("draft").lossy


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_tiny_architecture_cuts_at_its_first_layer(arch):
    model = tiny_model(arch)
    ids = torch.randint(3, 200, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fn = torch.compile(model, backend="llmcompile",
                           options={"recipe": _recipe(layers=[1]), "fallback": False})
        got = fn(input_ids=ids, use_cache=False).logits
        hidden = model(ids, output_hidden_states=True).hidden_states[1]
        norm = getattr(getattr(model, "model", None), "norm", None) or model.transformer.ln_f
        head = model.get_output_embeddings()
        want = head(norm(hidden))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_distilled_head_runs_the_trained_adapter_before_the_shared_head(tmp_path):
    from llmcompile.deploy.exit_heads import load_adapter, train_adapter
    from llmcompile.tools.exits import agreement, exit_logits

    model = tiny_model("llama", num_hidden_layers=4)
    tokens = torch.randint(3, 256, (512,), generator=torch.Generator().manual_seed(4))
    down, up = train_adapter(model, tokens, 2, rank=8, steps=60, batch=64, progress=False)
    with torch.no_grad():  # as when a decoding loop trains on first use
        again = train_adapter(model, tokens, 2, rank=8, steps=60, batch=64, progress=False)
    assert torch.equal(down, again[0]) and torch.equal(up, again[1])  # seeded
    assert all(p.requires_grad for p in model.parameters())  # the model's flags are untouched
    shared = agreement(model, tokens, [2])[2]
    distilled = agreement(model, tokens, [2], adapters={2: (down, up)})[2]
    assert distilled > shared
    path = tmp_path / "exit-{layer}.pt"
    torch.save({"down": down, "up": up, "layer": 2}, str(path).format(layer=2))
    assert torch.equal(load_adapter(str(path).format(layer=2))[0], down)
    ids = tokens[:PROMPT][None]
    cache = _prefilled(model, ids)
    with torch.no_grad():
        got = _step(model, _recipe(layers=[2], head="distilled", adapter=str(path)), cache,
                    torch.tensor([[7]]), PROMPT)
        hidden = model(torch.cat([ids, torch.tensor([[7]])], 1),
                       output_hidden_states=True).hidden_states[2]
        want = exit_logits(model, hidden, (down, up))[:, -1]
    torch.testing.assert_close(got[:, -1], want, rtol=1e-4, atol=1e-4)


def test_a_distilled_head_without_its_adapter_is_a_clear_error():
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(3, 256, (1, PROMPT))
    cache = new_cache(model, 16, torch.float32, torch.device("cpu"))
    for adapter, message in (("", "needs its trained adapter"), ("/nope/{layer}.pt",
                                                                  "does not exist")):
        with pytest.raises(Exception, match=message), torch.no_grad():
            _step(model, _recipe(layers=[2], head="distilled", adapter=adapter), cache,
                  ids, 0)


def test_exit_table_predicts_from_agreement_and_draft_share():
    from llmcompile.tools.exits import draft_share, exit_table, speculative_speedup

    model = tiny_model("llama", num_hidden_layers=4)
    assert 0 < draft_share(model, 1) < draft_share(model, 3) < 1
    assert speculative_speedup(1.0 - 1e-12, 0.0, 4) == pytest.approx(5.0)
    assert speculative_speedup(0.0, 0.5, 2) == pytest.approx(0.5)
    rows = exit_table(model, torch.randint(3, 256, (300,)), [1, 3])
    assert [r.layer for r in rows] == [1, 3] and all(1 <= r.best_k <= 8 for r in rows)
