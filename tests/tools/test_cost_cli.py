"""``llmcompile cost`` and ``llmcompile machine``: the report, its JSON, the cached profile."""

from __future__ import annotations

import json

import pytest
import sympy

from llmcompile.analysis.roofline import Machine
from llmcompile.tools import machine
from llmcompile.tools.cli import main
from llmcompile.tools.cost import LENGTHS, cost

PROFILE = Machine(read_bps=2e10, gemm_flops=1e11, weight_bps={"float32": 1.5e10, "int8": 1e10,
                                                               "int4": 7e9},
                  launch_s=8e-6, call_s=2.5e-4, description="a test profile")


@pytest.fixture
def profile(tmp_path, monkeypatch):
    """A cached profile; measuring this machine in a test fails the test."""
    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))
    path = machine.cache_path()
    path.write_text(json.dumps(PROFILE.to_dict()))

    def no(*a, **k):
        raise AssertionError("the cached profile should have been used")

    monkeypatch.setattr(machine, "measure_machine", no)
    return path


def test_cli_json_has_formulas_in_s_p_b(tmp_path, capsys):
    out = tmp_path / "cost.json"
    assert main(["cost", "llama", "--recipe", "int8", "--no-machine", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    s, p, b = sympy.symbols("s p b")
    prefill = sympy.sympify(data["prefill"]["flops"])
    decode = sympy.sympify(data["decode"]["flops"])
    assert prefill.free_symbols == {s, b} and decode.free_symbols == {p, b}
    assert sympy.sympify(data["decode"]["kv_bytes"]).free_symbols == {p, b}
    assert [x["pass"] for x in data["passes"]] == ["fuse", "quantize_weights"]
    assert "per layer" in data["passes"][1]["change"]
    assert [row["length"] for row in data["predicted"]] == list(LENGTHS)
    assert data["partial"] is False
    text = capsys.readouterr().out
    assert "prefill(s):" in text and "decode(p):" in text and "quantize_weights:" in text


def test_predicted_times_use_the_cached_profile(profile):
    report = cost("llama", "default")
    assert report.machine == PROFILE
    rows = report.predicted()
    # longer past, more KV bytes, slower decode; MBU from the decode weights
    assert rows[-1]["decode_s"] > rows[0]["decode_s"]
    first = rows[0]
    assert first["mbu"] == pytest.approx(first["decode_weight_bytes"] * first[
        "decode_tokens_per_s"] / PROFILE.read_bps)
    assert "TTFT ms" in report.format()


def test_calibrated_methods_are_costed_as_rtn_with_a_note():
    report = cost("llama", "int4", machine=None)
    assert any("costed as 'rtn'" in n for n in report.notes)


def test_machine_command_prints_the_cached_profile(profile, capsys):
    assert main(["machine"]) == 0
    out = capsys.readouterr().out
    assert "a test profile" in out and str(profile) in out


def test_an_unreadable_profile_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))
    machine.cache_path().write_text("{not json")
    monkeypatch.setattr(machine, "measure_machine", lambda progress: PROFILE)
    assert machine.load_machine(progress=lambda s: None) == PROFILE
    assert Machine.from_dict(json.loads(machine.cache_path().read_text())) == PROFILE


@pytest.mark.slow
def test_measure_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    found = machine.measure_machine(progress=lambda s: None)
    assert found.read_bps > 1e9 and found.gemm_flops > 1e9
    assert set(found.weight_bps) == {"float32", "int8", "int4"}
    assert found.launch_s >= 0 and found.call_s >= 0


def test_bench_points_for_the_plot(tmp_path):
    from llmcompile.tools.cost import _bench_points

    bench = {"model": "llama", "prompt_len": 128, "results": [
        {"name": "int8", "prefill_ms": 50.0, "decode_tokens_per_s": 30.0},
        {"name": "inductor", "prefill_ms": 60.0, "decode_tokens_per_s": 10.0},
        {"name": "int4", "prefill_ms": None, "decode_tokens_per_s": None}]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    assert _bench_points(path, "int8", "llama") == [
        {"prompt_len": 128, "prefill_ms": 50.0, "decode_tokens_per_s": 30.0}]
    assert _bench_points(path, "int4", "llama") == []
    assert _bench_points(path, "int8", "smollm2") == []  # another model's measurements


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from llmcompile.tools.cost import plot

    report = cost("llama", "default", machine=PROFILE)
    plot(report, tmp_path / "cost.png")
    assert (tmp_path / "cost.png").stat().st_size > 0


def test_a_model_that_cannot_be_captured_is_a_clear_error(monkeypatch, capsys):
    from llmcompile.deploy import export

    def fails(*a, **k):
        raise RuntimeError("torch.export: Unsupported data-dependent branch\n  deep frames")

    monkeypatch.setattr(export, "capture_causal_lm", fails)
    with pytest.raises(ValueError, match="cannot cost LlamaForCausalLM: capturing it with a "
                                         "KV cache .* Unsupported data-dependent branch$"):
        cost("llama", "default", machine=None)
    assert main(["cost", "llama", "--no-machine"]) == 2
    assert "llmcompile: error: cannot cost" in capsys.readouterr().err
