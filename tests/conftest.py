"""Shared test setup: private Inductor and llmcompile caches (a run never reuses another's
quantized layers or compiled graphs), fresh Dynamo state per test."""

import os
import tempfile

import pytest

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-inductor-"))
os.environ.setdefault("LLMCOMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-cache-"))

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ONNX ops of a tiny model (2 layers): GQA per layer; residual norms 2 per layer; rotary on q, k
TINY_LLAMA_ONNX_OPS = {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4,
                       "SimplifiedLayerNormalization": 1, "RotaryEmbedding": 4}


# llmcompile.export: a packed Q/K/V projection with its rotary becomes one GroupQueryAttention
# (do_rotary) per layer, no RotaryEmbedding
TINY_LLAMA_EXPORT_OPS = {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4,
                         "SimplifiedLayerNormalization": 1}


@pytest.fixture(scope="session")
def expected_onnx_ops() -> dict[str, dict[str, int]]:
    """Fused ONNX ops per tiny architecture of the test zoo (torch.compile, onnxruntime)."""
    ops = {arch: TINY_LLAMA_ONNX_OPS for arch in ("llama", "qwen2", "mistral", "phi3", "gemma")}
    return ops | {"gpt2": {"GroupQueryAttention": 2}, "gptj": {"GroupQueryAttention": 2}}


@pytest.fixture(scope="session")
def expected_export_ops(expected_onnx_ops) -> dict[str, dict[str, int]]:
    """Fused ONNX ops per tiny architecture in a file written by ``llmcompile.export``."""
    packed = {arch: TINY_LLAMA_EXPORT_OPS for arch in ("llama", "qwen2", "mistral", "gemma")}
    return expected_onnx_ops | packed
