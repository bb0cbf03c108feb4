"""llmcompile.generate: plain greedy equals HF generate; self-speculative equals plain greedy
(EOS inside a drafted block included); rollback leaves the cache of plain decoding; confident
exit stops early and keeps the cache consistent; sessions are compiled once."""

from __future__ import annotations

import pytest
import torch

import llmcompile
from llmcompile import load_recipe
from llmcompile.deploy.generate import session
from llmcompile.tools.cli import main
from llmcompile.tools.models import tiny_model

NEW = 12


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def reference(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


def _recipe(target="eager", **exit_options):
    passes = [{"name": "fuse"}]
    if exit_options:
        passes.append({"name": "early_exit", **exit_options})
    return load_recipe({"name": "ee", "target": target, "passes": passes})


def test_plain_greedy_through_inductor_equals_hf_generate(model, prompt, reference):
    ids, stats = llmcompile.generate(model, prompt, _recipe("inductor"), max_new_tokens=NEW,
                                     return_stats=True)
    assert torch.equal(ids, reference)
    assert stats.mode == "greedy" and stats.new_tokens == NEW


def test_score_is_the_full_models_teacher_forced_logits(model, reference):
    """Session.score: one prefill, then a decode step per token, on the compiled graphs."""
    run = session(model, _recipe("inductor"))
    got = run.score(reference[0], 5)
    with torch.no_grad():
        want = model(reference).logits[0, 4:-1]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="prefix"):
        run.score(reference[0], 0)


@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("layer", [1, 3])
def test_speculative_is_token_for_token_the_full_model(model, prompt, reference, k, layer):
    ids, stats = llmcompile.generate(model, prompt, _recipe(layers=[layer], draft_tokens=k),
                                     max_new_tokens=NEW, return_stats=True)
    assert torch.equal(ids, reference)
    assert stats.mode == "speculative" and stats.drafted == k * stats.verifications
    assert 0 <= stats.accepted <= stats.drafted
    assert stats.tokens_per_verification >= 1


def test_speculative_through_inductor(model, prompt, reference):
    ids = llmcompile.generate(model, prompt, _recipe("inductor", layers=[3], draft_tokens=3),
                              max_new_tokens=NEW)
    assert torch.equal(ids, reference)


def test_eos_inside_a_drafted_block_stops_there(model, prompt, reference):
    new = reference[0, prompt.shape[1]:].tolist()
    eos = new[5]
    stop = new.index(eos)
    ids = llmcompile.generate(model, prompt, _recipe(layers=[3], draft_tokens=4),
                              max_new_tokens=NEW, eos_token_id=eos)
    assert ids[0, prompt.shape[1]:].tolist() == new[:stop + 1]


def test_rollback_leaves_the_cache_of_plain_decoding(model, prompt):
    # drafts after 1 layer of a random model are mostly rejected: many rollbacks
    spec = session(model, _recipe(layers=[1], draft_tokens=4))
    ids, stats = spec.generate(prompt, NEW)
    assert stats.accepted < stats.drafted
    plain = session(model, _recipe())
    plain.generate(prompt, NEW)
    valid = prompt.shape[1] + NEW - 1  # the last token is emitted, never fed back
    for a, b in zip(spec.cache.layers, plain.cache.layers):
        torch.testing.assert_close(a.keys[:, :, :valid], b.keys[:, :, :valid])
        torch.testing.assert_close(a.values[:, :, :valid], b.values[:, :, :valid])
        assert int(a.cumulative_length) == int(b.cumulative_length) == valid


def test_confident_exit_uses_fewer_layers_and_keeps_going(model, prompt, reference):
    # a random 256-token model is never confident: a threshold just above uniform exits often
    low = _recipe(layers=[2], mode="confident", threshold=0.005)
    ids, stats = llmcompile.generate(model, prompt, low, max_new_tokens=NEW, return_stats=True)
    assert stats.exits.get(2, 0) > 0 and stats.mean_layers < 4
    assert ids.shape[1] == prompt.shape[1] + NEW
    high = _recipe(layers=[2], mode="confident", threshold=0.99)
    ids, stats = llmcompile.generate(model, prompt, high, max_new_tokens=NEW, return_stats=True)
    assert torch.equal(ids, reference) and stats.mean_layers == 4  # never confident: full model


def test_the_preset_checks_its_exit_against_the_model_before_compiling(model, prompt):
    recipe = load_recipe("early-exit")
    config = recipe.passes[-1]
    assert (config.mode, config.head, config.layers, config.draft_tokens, config.adaptive) == (
        "speculative", "distilled", (10,), 1, True)
    with pytest.raises(llmcompile.RecipeError, match="past the model"):
        llmcompile.generate(model, prompt, recipe)


def test_a_session_compiles_once_per_model_and_recipe(model, prompt):
    recipe = _recipe(layers=[2], draft_tokens=2)
    assert session(model, recipe) is session(model, recipe)
    assert session(model, recipe) is not session(model, _recipe(layers=[2], draft_tokens=3))


def test_bad_requests_raise_clear_errors(model, prompt):
    with pytest.raises(ValueError, match="one prompt at a time"):
        llmcompile.generate(model, prompt.repeat(2, 1), _recipe())
    with pytest.raises(ValueError, match="max_new_tokens"):
        llmcompile.generate(model, prompt, _recipe(), max_new_tokens=0)


def test_generate_command_takes_a_model_and_a_recipe(capsys, tmp_path):
    folder = tmp_path / "tiny"
    tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
    assert main(["generate", str(folder), "--prompt", "x", "--recipe", "early-exit"]) == 2
    assert "tokenizer" in capsys.readouterr().err


def test_confident_perplexity_scores_each_position_where_it_stopped(model):
    from llmcompile.tools.exits import confident_perplexity

    tokens = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logp = model(tokens[None]).logits[0].log_softmax(-1)
    full = torch.exp(-logp[8:-1].gather(-1, tokens[9:, None]).mean()).item()
    never = _recipe(layers=[2], mode="confident", threshold=0.99)
    ppl, stats = confident_perplexity(model, tokens, never, prefix=8)
    assert ppl == pytest.approx(full, rel=1e-4) and stats.mean_layers == 4
    always = _recipe(layers=[2], mode="confident", threshold=0.001)
    ppl, stats = confident_perplexity(model, tokens, always, prefix=8)
    assert stats.mean_layers == 2 and ppl != pytest.approx(full, rel=1e-4)
    with pytest.raises(ValueError, match="confident"):
        confident_perplexity(model, tokens, _recipe(layers=[2]))


def test_draft_policy_drafts_only_while_it_pays():
    from llmcompile.deploy.generate import _DraftPolicy

    def decisions(accepted: int, round_s: float, step_s: float, n: int = 400) -> list[bool]:
        policy, out = _DraftPolicy(k=2), []
        for _ in range(n):
            out.append(policy.draft())
            if out[-1]:
                policy.timed_round(round_s / 2, round_s / 2, accepted)
            else:
                policy.timed_step(step_s)
        return out

    # every draft accepted: 3 tokens per round of 2 steps' time -> always drafting after the
    # one-off plain measurement
    paying = decisions(accepted=2, round_s=2.0, step_s=1.0)
    assert paying[:8] == [True] * 8 and paying[8:12] == [False] * 4 and all(paying[12:])
    # nothing accepted: 1 token per round of 2 steps' time -> plain runs of 64, 128, 256...
    # tokens between probes of 8 rounds
    losing = decisions(accepted=0, round_s=2.0, step_s=1.0)
    probes = [i for i in range(1, len(losing)) if losing[i] and not losing[i - 1]]
    assert probes == [8 + 4 + 64, 8 + 4 + 64 + 8 + 128]
    assert sum(losing) == 24


def test_adaptive_switching_stays_token_for_token(model, prompt, reference, monkeypatch):
    from llmcompile.deploy import generate as gen

    pattern = iter([True, False, False, True, True, False] * 20)
    monkeypatch.setattr(gen._DraftPolicy, "draft", lambda self: next(pattern))
    ids, stats = llmcompile.generate(model, prompt, _recipe(layers=[1], draft_tokens=3),
                                     max_new_tokens=NEW, return_stats=True)
    assert torch.equal(ids, reference)
    assert stats.plain_steps > 0 and stats.verifications > 0
    assert "decoded without drafting" in stats.format()


@pytest.mark.parametrize("recipe", ["default", "int8", "int4-rtn", "window", "speculative"])
def test_every_preset_takes_a_one_token_prompt_and_new_lengths_compile_nothing(model, recipe):
    """A 1-token prompt runs the decode step; the prefill is compiled once for every later
    length; lossless recipes keep HF's greedy tokens."""
    from llmcompile import _compat

    if recipe == "speculative":  # the early-exit preset's settings, for a 4-layer model
        recipe = _recipe("inductor", layers=[2], head="shared", mode="speculative",
                         draft_tokens=2)
    torch._dynamo.reset()
    lengths = (1, 9, 5, 17)
    for i, n in enumerate(lengths):
        ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n))
        out = llmcompile.generate(model, ids, recipe, max_new_tokens=4)
        assert out.shape == (1, n + 4)
        if i == 1:
            graphs = _compat.dynamo_counters()[0]  # step (+ draft, verify) and the prefill
        if recipe in ("default", "window") or not isinstance(recipe, str):
            with torch.no_grad():
                want = model.generate(ids, max_new_tokens=4, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
            assert out.tolist() == want.tolist(), (recipe, n)
    assert _compat.dynamo_counters()[0] == graphs  # lengths 5 and 17 compiled nothing
