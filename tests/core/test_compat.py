"""Every private torch API and every transformers version difference sits in ``_compat``;
these tests name the versions they were written for, so a release that moves one fails here."""

import inspect

import torch
import transformers
from packaging.version import Version

from llmcompile import _compat
from llmcompile.tools.models import tiny_model

TORCH = Version(torch.__version__.split("+")[0])
TRANSFORMERS = Version(transformers.__version__)


def test_supported_versions():
    assert Version("2.11") <= TORCH < Version("2.15"), torch.__version__
    assert Version("5.23") <= TRANSFORMERS, transformers.__version__


def test_private_torch_apis_are_where_compat_expects_them():
    assert inspect.isclass(_compat.CustomGraphPass) and callable(_compat.get_hash_for_files)
    assert callable(_compat.compile_fx) and hasattr(_compat.inductor_config, "freezing")
    assert _compat.mode_options("max-autotune-no-cudagraphs")
    with _compat.no_tracing_context():
        pass
    fake = _compat.fake_mode_for([])
    assert fake.shape_env is not None
    gm = _compat.trace_aten(lambda x: torch.nn.functional.silu(x) * 2, [torch.randn(3)], None)
    assert any("silu" in str(n.target) for n in gm.graph.nodes)  # pre-dispatch: silu survives


def test_cache_keyword_follows_the_installed_transformers():
    model = tiny_model("llama")
    # 5.24 renamed past_key_values to cache (the old name warns; removal announced for 5.40)
    want = "cache" if Version("5.24") <= TRANSFORMERS else "past_key_values"
    assert _compat.cache_kwarg(model) == want
    assert _compat.cache_kwarg(model.forward) == want
    assert _compat.cache_kwarg(torch.compile(model.forward, backend="eager")) in (
        want, "past_key_values")


def test_causal_lm_model_types_lists_the_auto_mapping():
    types = _compat.causal_lm_model_types()
    assert {"llama", "gpt2", "qwen2"} <= set(types) and types == sorted(types)


def test_dynamo_counters_and_recompile_limit():
    graphs, breaks = _compat.dynamo_counters()
    torch.compile(lambda x: x + 1, backend="eager")(torch.randn(2))
    assert _compat.dynamo_counters()[0] == graphs + 1 and _compat.dynamo_counters()[1] >= breaks
    before = torch._dynamo.config.recompile_limit
    with _compat.recompile_limit(before + 5):
        assert torch._dynamo.config.recompile_limit == before + 5
    assert torch._dynamo.config.recompile_limit == before
