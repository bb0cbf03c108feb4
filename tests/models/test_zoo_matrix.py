"""The architecture matrix: every architecture of :data:`llmcompile.tools.zoo.ZOO` (tiny, random
weights) x targets ``inductor`` and ``onnxruntime`` x recipes ``default``, ``int8`` and
``int4-rtn``, each compiled fullgraph without fallback.

* lossless (``default``): Hugging Face ``generate`` with a static cache through the compiled
  forward gives eager's greedy tokens, and every step's logits match eager's to 1e-4;
* quantized: the logits' top-1 agreement with eager is at least :data:`TOP1`;
* the rules that fired on the first graph equal those recorded in ``zoo_rules.json`` (a fusion
  that stops firing on an architecture fails; ``LLMCOMPILE_UPDATE_ZOO=1`` records them anew).

The default run keeps a fast slice (:data:`FAST`); the rest is marked ``zoo`` (CI runs it).
"""

import json
import os
from pathlib import Path

import pytest
import torch

from llmcompile.backend import collect_reports
from llmcompile.lower import onnxruntime as ort_lower
from llmcompile.tools.models import tiny_model
from llmcompile.tools.zoo import EXCLUDED, ZOO, causal_lm_architectures

TARGETS = ("inductor", "onnxruntime")
RECIPES = ("default", "int8", "int4-rtn")
#: quantized recipes: fraction of positions whose greedy token equals eager's
#: (4 x 32 positions: fewer make the fraction too noisy; tiny random weights have small logit
#: margins, e.g. olmo2 int4-rtn agrees on 62-66% on both targets)
TOP1 = {"int8": 0.9, "int4-rtn": 0.5}
FAST = {"llama", "gpt2"}
RULES_FILE = Path(__file__).with_name("zoo_rules.json")
UPDATE = os.environ.get("LLMCOMPILE_UPDATE_ZOO") == "1"
#: arch -> (transformers release, rule): the rule fires from that release on (the recorded
#: counts are the newest release's). transformers 5.25 routes falcon's K / V through repeat_kv.
SINCE = {"falcon": ((5, 25), "attention_unrepeat_kv_masked")}


def _expected(arch: str, counts: dict) -> dict:
    """The recorded counts as the installed transformers fires them."""
    import transformers

    release, rule = SINCE.get(arch, ((0,), None))
    if tuple(int(p) for p in transformers.__version__.split(".")[:2]) >= release:
        return counts
    return {k: v for k, v in counts.items() if k != rule}


def _cells():
    for arch in ZOO:
        for target in TARGETS:
            for recipe in RECIPES:
                marks = () if arch in FAST else (pytest.mark.zoo,)
                yield pytest.param(arch, target, recipe, marks=marks,
                                   id=f"{arch}-{target}-{recipe}")


@pytest.fixture(scope="module")
def recorded():
    data = json.loads(RULES_FILE.read_text()) if RULES_FILE.exists() else {}
    yield data
    if UPDATE:
        RULES_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


@pytest.fixture(autouse=True)
def _fresh_sessions():
    ort_lower._SESSIONS.clear()
    yield
    ort_lower._SESSIONS.clear()


def _generate(model, ids):
    kwargs = dict(max_new_tokens=4, do_sample=False, cache_implementation="static",
                  pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(ids, **kwargs)


@pytest.mark.parametrize(("arch", "target", "recipe"), list(_cells()))
def test_cell(arch, target, recipe, recorded):
    model = tiny_model(arch)
    options = {"recipe": recipe, "target": target, "fallback": False}
    ids = torch.randint(3, 250, (1, 8), generator=torch.Generator().manual_seed(0))
    if recipe == "default":
        want = _generate(model, ids)
        model.forward = torch.compile(model.forward, backend="llmcompile", fullgraph=True,
                                      options=options)
        with collect_reports() as reports:
            got = _generate(model, ids)
        assert torch.equal(got.sequences, want.sequences)
        for g, w in zip(got.logits, want.logits, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    else:
        ids = torch.randint(3, 250, (4, 32), generator=torch.Generator().manual_seed(1))
        compiled = torch.compile(model.forward, backend="llmcompile", fullgraph=True,
                                 options=options)
        with torch.no_grad(), collect_reports() as reports:
            got = compiled(input_ids=ids, use_cache=False).logits
            want = model(input_ids=ids, use_cache=False).logits
        agree = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        assert agree >= TOP1[recipe], f"top-1 agreement {agree:.1%}"
    assert reports and all(r.fallback is None for r in reports)
    fired = {k: v for k, v in sorted(reports[0].counts().items()) if v}
    key = f"{arch}/{target}/{recipe}"
    if UPDATE:
        recorded[key] = fired
    assert key in recorded, f"no rule counts recorded for {key}: run with LLMCOMPILE_UPDATE_ZOO=1"
    assert fired == _expected(arch, recorded[key]), reports[0].format()


@pytest.mark.zoo
def test_every_causal_lm_architecture_is_in_the_zoo_or_excluded_with_a_reason():
    unlisted = sorted(set(causal_lm_architectures()) - set(ZOO) - set(EXCLUDED))
    assert not unlisted, f"classify these in llmcompile/tools/zoo.py: {unlisted}"
    assert not set(ZOO) & set(EXCLUDED)
    assert all(reason.strip() for reason in EXCLUDED.values())
