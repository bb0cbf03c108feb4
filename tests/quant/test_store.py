"""The quantization artifact store (llmcompile.quant.store) and `llmcompile cache`."""

import os
import subprocess
import sys

import pytest
import torch

from llmcompile.quant import store


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCOMPILE_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_round_trip_keeps_tensors_and_values():
    artifact = {"packed": torch.arange(12, dtype=torch.uint8).view(3, 4),
                "scales": torch.rand(3, 2, dtype=torch.bfloat16), "group_size": 64, "k": 128}
    store.save("ab" * 32, artifact, {"layer": "model.layers.0.mlp.down_proj"})
    back = store.load("ab" * 32)
    assert back["group_size"] == 64 and back["k"] == 128
    assert torch.equal(back["packed"], artifact["packed"])
    assert torch.equal(back["scales"], artifact["scales"])
    assert store.load("cd" * 32) is None


def test_digest_is_of_the_bytes_not_a_sum():
    a = torch.tensor([1.0, 2.0])
    b = torch.tensor([2.0, 1.0])  # the same sum
    assert store.digest(a) != store.digest(b)
    assert store.digest(a) == store.digest(a.clone())
    before = store.digest(a)
    a.add_(1)  # written in place: hashed again
    assert store.digest(a) != before


def test_a_broken_file_is_recomputed_not_trusted(cache_dir):
    store.save("ef" * 32, {"w": torch.ones(2)})
    store.file_of("ef" * 32).write_bytes(b"not a safetensors file")
    assert store.load("ef" * 32) is None


def test_size_cap_evicts_least_recently_used(monkeypatch):
    big = {"w": torch.zeros(256, 1024)}  # 1 MiB
    monkeypatch.setenv("LLMCOMPILE_CACHE_MAX_GB", str(2.5 / 1024))
    for i, key in enumerate(["a1", "b2"]):
        store.save(key * 32, big)
        os.utime(store.file_of(key * 32), (1000 + i, 1000 + i))  # distinct last use
    assert store.load("a1" * 32) is not None  # used now: the least recently used is b2
    store.save("c3" * 32, big)  # 3 MiB > 2.5: one goes
    kept = {e.path.name[:2] for e in store.entries()}
    assert kept == {"a1", "c3"}, kept


def test_cache_command_lists_sizes_and_clears(cache_dir):
    store.save("aa" * 32, {"w": torch.ones(4)}, {"layer": "lm_head", "config": "int4 g64 rtn"})
    env = {**os.environ, "LLMCOMPILE_CACHE_DIR": str(cache_dir)}

    def cli(*args):
        done = subprocess.run([sys.executable, "-m", "llmcompile.tools.cli", "cache", *args],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "lm_head" in cli("list") and "1 quantized layers" in cli("size")
    assert "removed 1" in cli("clear")
    assert store.entries() == []
