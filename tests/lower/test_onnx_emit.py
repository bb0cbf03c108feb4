"""Direct ONNX emission (``lower/onnx_emit.py``) against the traced way it replaces.

Both ways must write the same model (same fused ops, same numbers) for exported files; a graph the
direct way does not take goes the traced way with the reason logged, and stays exact.
"""

import collections
import logging

import numpy as np
import pytest
import torch

import llmcompile
from llmcompile.deploy import export as export_module
from llmcompile.deploy.runner import OnnxCausalLM
from llmcompile.lower import onnxruntime as lower
from llmcompile.testing import onnx_op_counts
from llmcompile.tools.models import tiny_model

pytest.importorskip("onnxruntime")

ORT = {"target": "onnxruntime", "fallback": False}


@pytest.fixture(autouse=True)
def _fresh_sessions():
    lower._SESSIONS.clear()
    yield
    lower._SESSIONS.clear()


def _ops(path) -> collections.Counter:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return collections.Counter(n.op_type for n in graph.node)


def _export(model, recipe: str, path, direct: bool, monkeypatch) -> tuple[OnnxCausalLM, str]:
    ways = []

    def to_onnx(*args, **kwargs):
        result = lower.to_onnx(*args, direct=direct, **kwargs)
        ways.append(result.way)
        return result

    monkeypatch.setattr(export_module, "to_onnx", to_onnx)
    result = llmcompile.export(model, path / "model.onnx", llmcompile.load_recipe(recipe))
    assert len(ways) == 1
    return OnnxCausalLM(result.path), ways[0]


@pytest.mark.parametrize("arch, recipe", [("llama", "default"), ("llama", "int4-rtn"),
                                          ("gpt2", "default")])
def test_direct_and_traced_files_are_the_same_model(arch, recipe, tmp_path, monkeypatch):
    model = tiny_model(arch)
    direct, way = _export(model, recipe, tmp_path / "direct", True, monkeypatch)
    assert way == "direct"
    traced, way = _export(model, recipe, tmp_path / "traced", False, monkeypatch)
    assert way == "traced"
    assert onnx_op_counts(direct.path) == onnx_op_counts(traced.path)  # the fused ops
    ops = _ops(direct.path)
    assert not {"SequenceAt", "SplitToSequence"} & set(ops)  # split into values, not a list
    assert all(op[0].isupper() for op in ops), ops  # ONNX ops, no torchlib function calls
    ids = np.random.default_rng(0).integers(3, 200, (1, 9))
    got, past = direct.forward(ids)
    expected, expected_past = traced.forward(ids)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    step, _ = direct.forward(ids[:, :2] + 1, past)  # decode over the cache
    expected_step, _ = traced.forward(ids[:, :2] + 1, expected_past)
    np.testing.assert_allclose(step, expected_step, atol=1e-5, rtol=1e-5)
    if recipe == "default":  # lossless: both are the model itself
        with torch.no_grad():
            eager = model(input_ids=torch.tensor(np.concatenate([ids, ids[:, :2] + 1], 1)),
                          use_cache=False).logits.numpy()
        np.testing.assert_allclose(np.concatenate([got, step], 1), eager, atol=1e-4, rtol=1e-4)
    assert direct.generate(ids[0], 6) == traced.generate(ids[0], 6)


def promoted(x):
    """int64 * 0.5, int64 + float32, int64 >= 2.5, sum of a bool: ATen promotes, ONNX ops need
    one operand type."""
    steps = torch.arange(x.shape[-1])
    return x * (steps * 0.5) + steps, (x > steps).sum(-1), (steps >= 2.5).sum(-1)


def test_implicit_type_promotion_is_made_explicit():
    x = torch.randn(3, 8)
    got = torch.compile(promoted, backend="llmcompile", options=ORT)(x)
    for g, e in zip(got, promoted(x)):
        torch.testing.assert_close(g, e)
    assert [s.model.way for s in lower._SESSIONS.values()] == ["direct"]
    assert _ops(next(iter(lower._SESSIONS.values())).model.path)["Cast"] >= 2


def decomposed(x):
    """``nan_to_num`` has no ONNX translation of its own; torch.export decomposes it."""
    return torch.nan_to_num(x.sin() / x.cos().clamp(max=0.1), posinf=3.0, neginf=-3.0)


def test_an_op_without_translation_takes_the_traced_way_and_says_why(caplog):
    x = torch.randn(4, 8)
    with caplog.at_level(logging.INFO, logger="llmcompile"):
        got = torch.compile(decomposed, backend="llmcompile", options=ORT)(x)
    torch.testing.assert_close(got, decomposed(x))
    assert [s.model.way for s in lower._SESSIONS.values()] == ["traced"]
    said = [r.getMessage() for r in caplog.records if "torch.onnx.export" in r.getMessage()]
    assert len(said) == 1 and "nan_to_num" in said[0] and "no ONNX translation" in said[0]


def test_a_tensor_registered_twice_is_one_initializer(tmp_path, monkeypatch):
    import onnx

    model = tiny_model("gpt2")  # tied embedding and LM head
    lm, way = _export(model, "default", tmp_path, True, monkeypatch)
    assert way == "direct"
    graph = onnx.load(str(lm.path), load_external_data=False).graph
    assert model.get_input_embeddings().weight is model.lm_head.weight
    names = {i.name for i in graph.initializer}
    assert len(names & {"transformer.wte.weight", "lm_head.weight"}) == 1, names


def test_a_torch_without_the_translator_api_takes_the_traced_way(monkeypatch, caplog):
    from llmcompile import _compat
    from llmcompile.lower import onnx_emit

    def moved(*args, **kwargs):
        raise ImportError("cannot import name '_registration'")

    monkeypatch.setattr(onnx_emit, "_REGISTRIES", {})
    monkeypatch.setattr(_compat, "onnx_registry", moved)
    x = torch.randn(3, 8)
    with caplog.at_level(logging.INFO, logger="llmcompile"):
        got = torch.compile(promoted, backend="llmcompile", options=ORT)(x)
    for g, e in zip(got, promoted(x)):
        torch.testing.assert_close(g, e)
    assert [s.model.way for s in lower._SESSIONS.values()] == ["traced"]
    assert any("translation registry" in r.getMessage() for r in caplog.records)


def test_constants_read_first_become_weights_in_graph_order():
    """The graph's first nodes are constants (a packed table gathered before anything else, as
    in a quantized tied embedding): their placeholders still come before every use."""
    from llmcompile.core.program import Program
    from llmcompile.lower import onnx_emit

    gm = torch.fx.GraphModule(torch.nn.Module(), torch.fx.Graph())
    gm.register_buffer("table", torch.randn(8, 4))
    gm.register_buffer("scales", torch.randn(8, 1))
    graph = gm.graph
    ids = graph.placeholder("ids")
    table, scales = graph.get_attr("table"), graph.get_attr("scales")
    rows = graph.call_function(torch.ops.aten.embedding.default, (table, ids))
    graph.output(graph.call_function(torch.ops.aten.mul.Tensor, (rows, scales)))
    for node, val in ((ids, torch.zeros(3, dtype=torch.long)), (table, gm.table),
                      (scales, gm.scales)):
        node.meta["val"] = val
    program = Program(gm)
    onnx_emit._constants_to_weights(program)
    program.graph.lint()  # every argument defined before it is read
    assert [n.op for n in program.graph.nodes] == ["placeholder"] * 3 + ["call_function"] * 2 + [
        "output"]
    assert sorted(program.sources.values()) == ["scales", "table"]
    assert {id(t) for t in program.weights.values()} == {id(gm.table), id(gm.scales)}
