"""``llmcompile bench``: the result's structure on the tiny llama (timings are never asserted)."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
import torch

from llmcompile.analysis.roofline import Machine
from llmcompile.tools import bench, machine
from llmcompile.tools.models import tiny_model

RESULT_FIELDS = ("model", "dtype", "prompt_len", "new_tokens", "repeats", "warmup", "threads",
                 "weight_bytes", "parameters", "memory_bandwidth", "results", "method")
ENTRY_FIELDS = ("name", "kind", "error", "compile_s", "first_run_s", "prefill_ms",
                "weight_bytes", "weight_bytes_source", "prefill_ms_runs", "decode_ms_runs",
                "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s", "mbu",
                "tokens", "tokens_match", "graphs_compiled", "recompiles_during_timing",
                "prefill_speedup", "decode_speedup", "warnings")


PROFILE = Machine(read_bps=2e10, gemm_flops=1e11, weight_bps={"float32": 1.5e10, "int8": 1e10,
                                                               "int4": 7e9},
                  launch_s=8e-6, call_s=2.5e-4, description="a test profile")


def write_profile() -> None:
    """A cached machine profile, so the bench does not measure this machine in a test."""
    path = machine.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(PROFILE.to_dict()))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        mp.setenv("LLMCOMPILE_CACHE_DIR", str(folder / "llmcompile"))
        write_profile()
        out = bench.run_bench("llama", prompt_len=8, new_tokens=4, repeats=2,
                              baselines=["eager", "inductor"], recipes=["default"],
                              bandwidth_mb=16, bandwidth_repeats=2, progress=False,
                              json_path=folder / "out.json")
    on_disk = json.loads((folder / "out.json").read_text())
    return out, on_disk


def test_json_structure(result):
    out, on_disk = result
    assert json.loads(json.dumps(out)) == on_disk
    for key in RESULT_FIELDS:
        assert key in on_disk, key
    assert on_disk["model"] == "llama" and on_disk["prompt_len"] == 8
    assert on_disk["weight_bytes"] > 0
    assert on_disk["method"].startswith("interleaved") and on_disk["repeats"] == 2
    assert on_disk["cpu"].startswith("ATen ")  # the kernel ISA and CPU flags of the run
    bw = on_disk["memory_bandwidth"]
    assert bw["read_GBps"] > 0 and bw["copy_GBps"] > 0 and bw["bytes"] == 16 * 2**20
    names = [(r["kind"], r["name"]) for r in on_disk["results"]]
    assert names == [("baseline", "eager"), ("baseline", "inductor"), ("recipe", "default")]


def test_entries(result):
    _, on_disk = result
    for entry in on_disk["results"]:
        for key in ENTRY_FIELDS:
            assert key in entry, (entry["name"], key)
        assert entry["error"] is None, entry["error"]
        for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms_per_token",
                    "decode_tokens_per_s", "mbu", "first_run_s", "prefill_speedup",
                    "decode_speedup"):
            assert entry[key] > 0, (entry["name"], key)
        assert entry["compile_s"] >= 0 and entry["warmup_overhead_s"] >= 0
        assert len(entry["tokens"]) == 4
        assert len(entry["prefill_ms_runs"]) == len(entry["decode_ms_runs"]) == 2  # rounds
        assert entry["weight_bytes"] > 0
        assert isinstance(entry["tokens_match"], bool)
        assert entry["recompiles_during_timing"] >= 0
    eager, inductor, default = on_disk["results"]
    assert eager["tokens_match"] is True and eager["graphs_compiled"] == 0
    assert inductor["tokens_match"] is True
    assert inductor["graphs_compiled"] >= 2  # prefill and decode are two specializations
    assert eager["compile_s"] == 0
    assert default["graphs_compiled"] >= 1 and "rules_fired" in default
    assert default["weight_bytes_source"] == inductor["weight_bytes_source"] == (
        "cost model (decode graph)")
    assert eager["weight_bytes"] == on_disk["weight_bytes"]
    assert eager["weight_bytes_source"] == "parameters"
    # the decode graph also reads one embedding row (hidden 64) and the rotary inv_freq (8)
    assert inductor["weight_bytes"] == default["weight_bytes"] == (
        eager["weight_bytes"] + 64 * 4 + 8 * 4)
    # every configuration keeps its own compiled callable: nothing recompiles while timing
    assert all(e["recompiles_during_timing"] == 0 for e in on_disk["results"])


def test_table(result):
    out, _ = result
    table = bench.format_table(out)
    for label in ("eager", "inductor", "llmc:default", "memory bandwidth", "MBU",
                  "weights MiB", "interleaved"):
        assert label in table


def test_cli_arguments():
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args([])
    assert (args.model, args.prompt_len, args.new_tokens, args.dtype) == ("smollm2", 128, 32,
                                                                         "float32")
    assert args.baselines == ["eager", "inductor"] and args.recipes == ["default"]
    args = parser.parse_args(["--model", "llama", "--recipes", "default", "x.toml",
                              "--baselines", "eager", "--json", "o.json", "--threads", "1",
                              "--dtype", "bfloat16", "--repeats", "3"])
    assert args.recipes == ["default", "x.toml"] and args.baselines == ["eager"]
    assert (args.json, args.threads, args.dtype, args.repeats) == ("o.json", 1, "bfloat16", 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["--baselines", "onnx"])
    args = parser.parse_args(["--baselines", "torchao-int8", "torchao-int4"])
    assert args.baselines == ["torchao-int8", "torchao-int4"]


@pytest.mark.parametrize("kwargs", [dict(dtype="float16"), dict(new_tokens=1), dict(warmup=1),
                                    dict(baselines=["tensorrt"]), dict(recipes=["no-such"])])
def test_bad_arguments_fail_before_running(kwargs):
    with pytest.raises(Exception):  # noqa: B017 - ValueError or RecipeError
        bench.run_bench("llama", progress=False, **kwargs)


def test_weight_bytes_counts_tied_weights_once_and_skips_an_untied_input_embedding():
    tied = tiny_model("llama", tie_word_embeddings=True)
    expected = sum(p.numel() for p in tied.parameters()) * 4  # parameters() dedups ties
    assert bench.weight_bytes(tied) == expected
    untied = tiny_model("llama", tie_word_embeddings=False)
    emb = untied.get_input_embeddings().weight
    all_params = sum(p.numel() for p in untied.parameters()) * 4
    fp32 = bench.weight_bytes(untied)
    assert fp32 == all_params - emb.numel() * 4  # decoding gathers rows, it reads the head
    assert fp32 == expected  # same shapes: the LM head replaces the tied table
    assert bench.weight_bytes(untied.to(torch.bfloat16)) == fp32 // 2  # .to() is in place


class _FakeRunner:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def run(self):
        self.log.append(self.name)
        return 0.001, [0.002, 0.003], [1, 2, 3]


def test_rounds_are_interleaved_and_rotated():
    log: list[str] = []
    configs = []
    for name in ("a", "b", "c"):
        c = bench.Config(name, "baseline")
        c.runner, c.tokens, c.warm_times = _FakeRunner(name, log), [1, 2, 3], [1.0, 0.1]
        configs.append(c)
    bench._time_rounds(configs, 3, bar=type("Bar", (), {"update": lambda *a: None,
                                                        "set_description": lambda *a: None})())
    # one untimed round, then rounds rotated by one each
    assert log == list("abc") + list("abc") + list("bca") + list("cab")
    for c in configs:
        assert len(c.prefills) == len(c.step_medians) == 3
        assert c.entry["decode_ms_runs"] == pytest.approx([2.5] * 3)
        bench._finish(c, warmup=2, prompt_len=8)
        assert c.entry["decode_ms_per_token"] == pytest.approx(2.5)


def test_missing_torchao_is_a_configuration_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    out = bench.run_bench("llama", prompt_len=4, new_tokens=2, repeats=1,
                          baselines=["eager", "torchao-int8"], recipes=[], bandwidth_mb=4,
                          bandwidth_repeats=1, progress=False)
    eager, tao = out["results"]
    assert eager["error"] is None
    assert "torchao" in tao["error"] and tao["prefill_ms"] is None and tao["mbu"] is None
    assert "error" in bench.format_table(out)


def test_torchao_baselines(tmp_path, monkeypatch):
    pytest.importorskip("torchao")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = bench.run_bench("llama", prompt_len=4, new_tokens=2, repeats=1,
                          baselines=["torchao-int8", "torchao-int4"], recipes=[],
                          bandwidth_mb=4, bandwidth_repeats=1, progress=False)
    int8, int4 = out["results"]
    assert int8["error"] is None, int8["error"]
    assert out["torchao"] and int8["torchao"].startswith("torchao")
    dense = out["weight_bytes"]
    assert int8["weight_bytes"] < dense and int8["decode_tokens_per_s"] > 0
    assert len(int8["tokens"]) == 2 and isinstance(int8["tokens_match"], bool)
    if int4["error"] is None:  # torchao's int4 CPU path may be missing in some versions
        assert int4["weight_bytes"] < int8["weight_bytes"]
    else:
        assert isinstance(int4["error"], str) and int4["error"]


def test_predicted_beside_measured(result):
    out, on_disk = result
    assert on_disk["machine"] == PROFILE.to_dict()
    by_name = {r["name"]: r for r in out["results"]}
    for name in ("inductor", "default"):
        r = by_name[name]
        assert r["weight_bytes_source"] == "cost model (decode graph)"
        assert r["predicted_decode_ms"] > PROFILE.call_s * 1e3  # at least the call overhead
        assert r["predicted_tokens_per_s"] == pytest.approx(1e3 / r["predicted_decode_ms"])
        assert "overhead" in r["prediction"] and "vs measured" in r["prediction"]
    assert by_name["eager"]["predicted_decode_ms"] is None
    assert "dispatch" in by_name["eager"]["prediction"]
    assert "predicted by the cost model" in bench.format_table(out)


def test_bench_weight_bytes_equal_the_cost_tools(result):
    """One source of truth: `llmcompile cost`'s decode weight bytes (export capture) equal the
    bench's "weights MiB" of the same recipe (its compiled decode graph)."""
    import sympy

    from llmcompile.analysis.cost import B
    from llmcompile.tools.cost import cost

    out, _ = result
    default = next(r for r in out["results"] if r["name"] == "default")
    decode = cost("llama", "default", machine=None).decode()
    assert decode.weights.subs(B, 1) == default["weight_bytes"]
    assert isinstance(decode.weights, sympy.Expr)


def test_missing_llama_cpp_is_a_configuration_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    out = bench.run_bench("llama", prompt_len=4, new_tokens=2, repeats=1,
                          baselines=["eager", "llama.cpp"], recipes=[], bandwidth_mb=4,
                          bandwidth_repeats=1, progress=False, predict=False)
    eager, cpp = out["results"]
    assert eager["error"] is None
    assert "llama-cpp-python" in cpp["error"] and cpp["decode_tokens_per_s"] is None


def test_gguf_bytes_count_the_tied_embedding_once():
    from llmcompile.tools.peers_cpu import default_gguf, gguf_bytes

    path = default_gguf()  # SmolLM2's file ties the LM head to the embedding: counted once
    assert 50e6 < gguf_bytes(path) <= path.stat().st_size


def test_generate_loop_and_hf_generate_baseline(tmp_path, monkeypatch):
    """Recipes through llmcompile.generate's graphs, plain Inductor under HF generate: both
    decode the eager model's greedy tokens (the float recipe is lossless)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    out = bench.run_bench("llama", prompt_len=6, new_tokens=4, repeats=1,
                          baselines=["eager", "inductor-hf-generate"], recipes=["default"],
                          bandwidth_mb=4, bandwidth_repeats=1, progress=False, predict=False,
                          loop="generate")
    assert out["loop"] == "generate"
    for entry in out["results"]:
        assert entry["error"] is None, (entry["name"], entry["error"])
        assert entry["tokens_match"] is True, entry["name"]
        assert entry["decode_tokens_per_s"] > 0
    with pytest.raises(ValueError, match="loop"):
        bench.run_bench("llama", loop="python", progress=False)
    with pytest.raises(FileNotFoundError, match="gguf"):
        bench.run_bench("llama", gguf=str(tmp_path / "missing.gguf"), progress=False)


@pytest.mark.skipif(__import__("importlib").util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed")
def test_llama_cpp_runner_decodes_the_shipped_gguf():
    from llmcompile.tools.peers_cpu import LlamaCppRunner, default_gguf

    prompt = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    runner = LlamaCppRunner(default_gguf(), prompt, 4, threads=1)
    first = runner.run()
    assert len(first[2]) == 4 and len(first[1]) == 3 and first[0] > 0
    assert runner.run()[2] == first[2]  # reset between runs: same greedy tokens
