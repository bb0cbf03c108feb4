"""Start-up in fresh processes (issue 28): calibration that does not depend on the prompt,
quantized layers stored and reused, torch's compile caches hit for every llmcompile graph, and
a warm start shipped to another cache folder (``save_artifacts`` / ``load_artifacts``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CHILD = Path(__file__).with_name("startup_child.py")


def _run(prompts: str, target: str, cache: Path, *extra: str) -> dict:
    env = {**os.environ, "LLMCOMPILE_CACHE_DIR": str(cache / "llmc"),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "LLMCOMPILE_PROFILE": "0"}
    done = subprocess.run([sys.executable, str(CHILD), prompts, target, *extra], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _artifacts(cache: Path) -> dict[str, tuple]:
    """file name -> (metadata, tensor name -> bytes); a safetensors header's key order is not
    fixed, so files are compared by content."""
    from safetensors import safe_open

    out = {}
    for path in (cache / "llmc" / "quant").glob("*/*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy()
                       .tobytes() for k in f.keys()}  # noqa: SIM118
            out[path.name] = (dict(f.metadata()), tensors)
    return out


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A cold process: a prompt of 20 tokens, then one of 1 token; its artifacts saved."""
    folder = tmp_path_factory.mktemp("first")
    result = _run("20,1", "inductor", folder, "--save", str(folder / "shipped"))
    return folder, result


def test_first_process_calibrates_once_and_takes_a_one_token_prompt(first):
    _, result = first
    assert [len(t) for t in result["tokens"]] == [4, 4]
    assert result["stages"]["calibration"] >= 1
    assert result["stages"]["quant layers solved"] == 9  # 2 x (qkv, o, gate_up, down) + head


def test_quantized_weights_do_not_depend_on_the_first_prompt(first, tmp_path):
    folder, _ = first
    _run("1", "eager", tmp_path)  # another process, a 1-token first prompt, another target
    mine, theirs = _artifacts(tmp_path), _artifacts(folder)
    assert len(mine) == 9 and mine == theirs  # byte-identical tensors under the same keys


def test_second_process_calibrates_nothing_and_hits_torch_caches(first):
    folder, cold = first
    # the first process's prompt length: torch 2.14 keys AOTAutograd's entry of a dynamic
    # graph by the size it was first called with (its FX graph cache hits for any length)
    warm = _run("20", "inductor", folder)
    stages = warm["stages"]
    assert "calibration" not in stages and "quant layers solved" not in stages
    assert stages["quant layers loaded"] == 9
    # prefill and decode step: both torch caches hit, nothing missed
    assert stages["fxgraph_cache_hit"] >= 2 and stages["autograd_cache_hit"] >= 2, stages
    assert "fxgraph_cache_miss" not in stages and "autograd_cache_miss" not in stages, stages


def test_shipped_artifacts_start_warm_in_empty_caches(first, tmp_path):
    folder, _ = first
    warm = _run("20", "inductor", tmp_path, "--load", str(folder / "shipped"))
    stages = warm["stages"]
    assert "calibration" not in stages and stages["quant layers loaded"] == 9
    assert "kernel build" not in stages  # the kernels' build came along
    assert stages.get("fxgraph_cache_hit", 0) >= 2, stages
