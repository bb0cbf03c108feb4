"""Decode steps called without Dynamo (llmcompile.deploy.direct): same tokens and cache as the
Dynamo path, Dynamo really skipped, caches re-bound, and the cases that must stay on Dynamo."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx

import llmcompile
from llmcompile import load_recipe
from llmcompile.core.program import CompiledGraph
from llmcompile.deploy import direct
from llmcompile.deploy.generate import Session
from llmcompile.tools.models import tiny_model

NEW = 10


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", num_hidden_layers=3)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def reference(model, prompt):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


def _recipe(name: str, target: str = "inductor"):
    return load_recipe({"name": name, "target": target, "passes": [{"name": "fuse"}]})


class _Counted:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, **kwargs):
        self.calls += 1
        return self.fn(**kwargs)


def _cache_rows(s: Session, length: int) -> list[torch.Tensor]:
    return [t[..., :length, :].clone() for layer in s.cache.layers
            for t in (layer.keys, layer.values)]


def test_direct_steps_skip_dynamo_and_equal_it(model, prompt, reference, monkeypatch):
    s = Session(model, _recipe("direct"))
    ids, _ = s.generate(prompt, NEW)
    assert torch.equal(ids, reference)
    assert s._direct is not None and s._direct_ready
    s.step = counted = _Counted(s.step)
    ids, _ = s.generate(prompt, NEW)
    assert torch.equal(ids, reference)
    assert counted.calls == 0  # every step went around Dynamo
    direct_cache = _cache_rows(s, prompt.shape[1] + NEW - 1)

    monkeypatch.setenv("LLMCOMPILE_DIRECT_STEP", "0")
    plain = Session(model, _recipe("dynamo"))
    ids, _ = plain.generate(prompt, NEW)
    assert torch.equal(ids, reference) and plain._direct is None
    for got, want in zip(direct_cache, _cache_rows(plain, prompt.shape[1] + NEW - 1)):
        torch.testing.assert_close(got, want)


def test_a_new_cache_is_rebound_or_dropped(model, prompt, reference):
    s = Session(model, _recipe("rebind"))
    s.generate(prompt, NEW)
    old = s.cache
    s.cache, s.max_len = None, 0  # the next call allocates a new cache of the same shapes
    ids, _ = s.generate(prompt, NEW)
    assert s.cache is not old and s._direct_ready and torch.equal(ids, reference)
    assert any(a is s.cache.layers[0].keys for a in s._direct.args)
    assert not any(a is old.layers[0].keys for a in s._direct.args)
    # a longer cache (another bucket) has other shapes: that graph no longer applies
    assert not s._direct.bind(type(old)(config=model.config, max_cache_len=2 * s.max_len))


def test_python_side_effects_keep_steps_on_dynamo(model, prompt, reference):
    s = Session(model, _recipe("side-effects", target="eager"))
    step = s.step

    def counting_step(**kwargs):  # as a cache that counts in a Python int would
        kwargs[s.cache_kw].layers[0].python_counter = getattr(
            kwargs[s.cache_kw].layers[0], "python_counter", 0) + 1
        return step(**kwargs)

    s.step = counting_step
    ids, _ = s.generate(prompt, NEW)
    assert torch.equal(ids, reference)
    assert s._direct is None and not s._direct_ready


def test_python_state_sees_plain_attributes_only():
    cache = type("Cache", (), {})()
    cache.layers = [type("Layer", (), {})()]
    cache.layers[0].keys, cache.layers[0].count = torch.zeros(2), 3
    before = direct.python_state(cache)
    cache.layers[0].keys.add_(1)  # tensors change inside graphs: not Python state
    assert direct.python_state(cache) == before
    cache.layers[0].count = 4
    assert direct.python_state(cache) != before


def test_inputs_that_are_neither_the_models_nor_the_caches_are_refused(model):
    def step(l_kwargs_input_ids_, other):
        return (l_kwargs_input_ids_ + other,)

    gm = fx.symbolic_trace(step)
    ids = torch.tensor([[1]])
    assert direct.build([CompiledGraph(gm, [ids, torch.zeros(1)], step)], model, None) is None
    assert direct.build([], model, None) is None  # nothing compiled for the step
    two = CompiledGraph(gm, [ids, model.lm_head.weight], step)
    assert direct.build([two, two], model, None) is None  # a graph break: two graphs


def test_generate_uses_them_by_default(model, prompt, reference):
    ids = llmcompile.generate(model, prompt, _recipe("default-path"), max_new_tokens=NEW)
    assert torch.equal(ids, reference)
