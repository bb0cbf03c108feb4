"""Capture: torch.export programs become the same IR as Dynamo graphs; metadata survives."""

import torch

from llmcompile import load_recipe
from llmcompile.core.pipeline import run_pipeline
from llmcompile.core.program import capture_export
from llmcompile.tools.explain import explain
from llmcompile.tools.models import tiny_model


def _export_args(ep, ids):
    tensors = {**ep.state_dict, **ep.constants}
    sig = ep.graph_signature
    named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    args = []
    for node in ep.graph_module.graph.nodes:
        if node.op == "placeholder":
            args.append(tensors[named[node.name]] if node.name in named else ids)
    return args


def test_export_program_rewrites_like_dynamo_and_keeps_metadata():
    model = tiny_model("llama")
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        ep = torch.export.export(model, (ids,), {"use_cache": False})
        want = model(input_ids=ids, use_cache=False).logits
    program = capture_export(ep)
    assert len(program.weights) >= 10
    assert any(src.endswith("q_proj.weight") for src in program.sources.values())
    report = run_pipeline(program, load_recipe("default"))
    assert report.fired("rmsnorm") == 5
    for node in program.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta
    fused = [n for n in program.graph.nodes if n.meta.get("llmc_rule")]
    paths = {program.module_path(n) for n in fused}
    assert "model.layers.0.input_layernorm" in paths and "model.norm" in paths
    with torch.no_grad():
        got = program.gm(*_export_args(ep, ids))
    got = got[0] if isinstance(got, (list, tuple)) else got
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_explain_reports_rules_and_module_paths():
    reports = explain("llama", "default")
    assert len(reports) == 1
    assert reports[0].fired("rmsnorm") == 5
    text = reports[0].format()
    assert "rmsnorm" in text and "fired" in text


def test_explain_accepts_a_config_folder(tmp_path):
    from llmcompile.tools.models import tiny_config

    tiny_config("qwen2").save_pretrained(tmp_path)
    reports = explain(str(tmp_path / "config.json"), "default")
    assert reports[0].fired("qkv_projection_bias") == 2
