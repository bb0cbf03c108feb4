"""``llmcompile bench``: the result's structure on the tiny llama (timings are never asserted)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from llmcompile import bench
from llmcompile.models import tiny_model

RESULT_FIELDS = ("model", "dtype", "prompt_len", "new_tokens", "repeats", "warmup", "threads",
                 "weight_bytes", "parameters", "memory_bandwidth", "results")
ENTRY_FIELDS = ("name", "kind", "error", "compile_s", "first_run_s", "prefill_ms",
                "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s", "mbu",
                "tokens", "tokens_match", "graphs_compiled", "recompiles_during_timing",
                "prefill_speedup", "decode_speedup", "warnings")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
        out = bench.run_bench("llama", prompt_len=8, new_tokens=4, repeats=1,
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
        assert isinstance(entry["tokens_match"], bool)
        assert entry["recompiles_during_timing"] >= 0
    eager, inductor, default = on_disk["results"]
    assert eager["tokens_match"] is True and eager["graphs_compiled"] == 0
    assert inductor["tokens_match"] is True
    assert inductor["graphs_compiled"] >= 2  # prefill and decode are two specializations
    assert eager["compile_s"] == 0
    assert default["graphs_compiled"] >= 1 and "rules_fired" in default


def test_table(result):
    out, _ = result
    table = bench.format_table(out)
    for label in ("eager", "inductor", "llmc:default", "memory bandwidth", "MBU"):
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


@pytest.mark.parametrize("kwargs", [dict(dtype="float16"), dict(new_tokens=1), dict(warmup=1),
                                    dict(baselines=["tensorrt"]), dict(recipes=["no-such"])])
def test_bad_arguments_fail_before_running(kwargs):
    with pytest.raises(Exception):  # noqa: B017 - ValueError or RecipeError
        bench.run_bench("llama", progress=False, **kwargs)


def test_weight_bytes_counts_tied_weights_once():
    model = tiny_model("llama", tie_word_embeddings=True)
    expected = sum(p.numel() for p in model.parameters()) * 4  # parameters() dedups ties
    assert bench.weight_bytes(model) == expected
    untied = tiny_model("llama", tie_word_embeddings=False)
    fp32 = bench.weight_bytes(untied)
    assert fp32 > expected
    assert bench.weight_bytes(untied.to(torch.bfloat16)) == fp32 // 2  # .to() is in place
