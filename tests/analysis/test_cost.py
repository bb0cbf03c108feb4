"""The cost model: exact formulas on tiny models, as sympy identities."""

from __future__ import annotations

import itertools

import pytest
import sympy
import torch
from torch import nn

from llmcompile.analysis.cost import B, P, S, attention_pairs, graph_cost
from llmcompile.analysis.delta import CostObserver
from llmcompile.analysis.roofline import Machine, predict
from llmcompile.core.pipeline import run_pipeline
from llmcompile.core.program import capture_function
from llmcompile.registry import resolve_recipe
from llmcompile.tools.cost import _capture
from llmcompile.tools.models import tiny_model

LAYERS, HEADS, HEAD_DIM = 2, 4, 16  # the tiny llama: hidden 64, 4 heads, 2 kv heads


def _is_zero(expr) -> bool:
    return sympy.simplify(sympy.expand(expr)) == 0


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _costed(model, recipe: str):
    program, rename = _capture(model)
    report = run_pipeline(program, resolve_recipe(recipe), observe=CostObserver(rename))
    return program, report


def _linear_params(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


@pytest.mark.parametrize("recipe", ["default", "int8", "int4-rtn"])
def test_matmul_flops_are_two_per_parameter_per_token(llama, recipe):
    _, report = _costed(llama, recipe)
    kinds = report.cost.after.by_kind()
    flops = sum(kinds[k].flops for k in ("matmul", "packed") if k in kinds)
    assert _is_zero(flops - 2 * _linear_params(llama) * B * S)


def test_attention_flops_over_a_past_of_p(llama):
    _, report = _costed(llama, "default")
    attention = report.cost.after.by_kind()["attention"].flops
    decode = attention.subs(S, 1)
    assert _is_zero(decode - 4 * LAYERS * HEADS * HEAD_DIM * (P + 1) * B)
    # prefill: causal, each of s queries sees its own prefix
    assert _is_zero(attention.subs(P, 0) - 4 * LAYERS * HEADS * HEAD_DIM * B * S * (S + 1) / 2)


def test_window_caps_the_past():
    w, n = 8, 2
    decode = attention_pairs(1, P + 1, window=w, sinks=n)
    for p in range(0, 30):
        assert decode.subs(P, p) == min(p + 1, w + n)


@pytest.mark.parametrize("causal,window,sinks", [(True, 0, 0), (True, 4, 0), (True, 4, 2),
                                                 (False, 0, 0), (True, 1, 3)])
def test_pairs_equal_the_reference_mask(causal, window, sinks):
    from llmcompile.analysis.masks import _reference

    for s, past in itertools.product(range(1, 9), range(0, 9)):
        t = s + past
        if causal:
            keep = _reference(s, t, 0)
            if window:
                q = torch.arange(s).unsqueeze(-1) + past
                k = torch.arange(t).unsqueeze(0)
                keep = keep & ((q - k < window) | (k < sinks))
        else:
            keep = torch.ones(s, t, dtype=torch.bool)
        pairs = attention_pairs(S, S + P, causal=causal, window=window, sinks=sinks)
        assert int(sympy.sympify(pairs).subs({S: s, P: past})) == int(keep.sum()), (s, past)


@pytest.mark.parametrize("recipe", ["default", "int8", "int4-rtn"])
def test_weight_bytes_are_the_reports_plus_one_embedding_row(llama, recipe):
    """One source of truth: the cost model's weights per decode token are what the pipeline
    report counts (packed constants included, exactly) plus the gathered embedding row."""
    program, report = _costed(llama, recipe)
    hidden = llama.config.hidden_size
    decode = report.cost.after.total().subs({S: 1, B: 1})
    assert decode.weights == report.weight_bytes + hidden * 4


def test_quantization_shrinks_weight_bytes_by_the_packed_sizes(llama):
    _, dense = _costed(llama, "default")
    _, int8 = _costed(llama, "int8")
    w_dense = dense.cost.after.total().weights.subs({S: 1, B: 1})
    w_int8 = int8.cost.after.total().weights.subs({S: 1, B: 1})
    params = _linear_params(llama)
    rows = sum(m.weight.shape[0] for m in llama.modules() if isinstance(m, nn.Linear))
    # float32 -> 1 byte per weight + one scale per output row (in the activation dtype)
    from llmcompile.ops import cpu

    scale = torch.empty((), dtype=cpu.packed_activation_dtype()).element_size()
    assert w_dense - w_int8 == 3 * params - rows * scale
    delta = next(run.cost for run in int8.runs if run.name == "quantize_weights")
    assert "per layer" in str(delta) and "(layers 0-1)" in str(delta)


def test_fuse_reports_its_node_changes(llama):
    _, report = _costed(llama, "default")
    fuse = next(run for run in report.runs if run.name == "fuse")
    ops = fuse.cost.ops()
    assert ops["llmcompile.add_rms_norm"] == 2 * LAYERS
    assert ops["llmcompile.rms_norm"] == 1
    assert _is_zero(fuse.cost.change().weights)  # fusion moves no weight bytes
    assert "cost:" in report.format()


def test_unknown_ops_are_listed_and_the_cost_is_partial():
    def fn(x, w):
        return torch.fft.fft(x @ w).real

    args = [torch.randn(4, 8), torch.randn(8, 16)]
    program = capture_function(fn, args, weights=[1])
    cost = graph_cost(program.graph, program.is_weight)
    assert cost.partial and any("fft" in name for name in cost.unknown)
    sizes = _sizes(program, args)
    assert cost.total().flops.subs(sizes) == 2 * 4 * 8 * 16  # the matmul is still costed
    assert cost.total().weights.subs(sizes) == 8 * 16 * 4


def _sizes(program, args) -> dict:
    """The capture's size symbols -> the example's sizes."""
    holders = [n for n in program.graph.nodes if n.op == "placeholder"]
    return {d.node.expr: real for n, a in zip(holders, args)
            for d, real in zip(n.meta["val"].shape, a.shape) if isinstance(d, torch.SymInt)}


def test_decode_kv_bytes_grow_with_the_past(llama):
    _, report = _costed(llama, "default")
    kv = report.cost.after.total().kv.subs(S, 1)
    per_token = sympy.diff(kv, P)
    # attention reads k and v of every cached position: 2 tensors x kv_heads x head_dim x 4 B
    assert per_token >= LAYERS * 2 * 2 * HEAD_DIM * 4 * B


def test_roofline_prediction_adds_up():
    def fn(x, w):
        return torch.relu(x @ w)

    args = [torch.randn(1, 256), torch.randn(256, 1024)]
    program = capture_function(fn, args, weights=[1])
    cost = graph_cost(program.graph, program.is_weight)
    machine = Machine(read_bps=1e10, gemm_flops=1e11, weight_bps={"float32": 5e9},
                      launch_s=1e-5, call_s=1e-4)
    p = predict(cost, _sizes(program, args), machine)
    weights = 256 * 1024 * 4
    acts = (256 + 1024) * 4  # the matmul reads x, writes y
    relu = 2 * 1024 * 4
    assert p.memory_s == pytest.approx(weights / 5e9 + acts / 1e10 + relu / 1e10)
    assert p.overhead_s == pytest.approx(1e-4 + cost.launches * 1e-5)
    assert cost.launches == 1  # relu fuses into its neighbour
    assert Machine.from_dict(machine.to_dict()) == machine
