"""Measurement primitives shared by the benchmarks: memory bandwidth, weight bytes per decode
step, and the torchao weight-only peers (quantized in place)."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

__all__ = ["TORCHAO_INT4_GROUP", "measure_bandwidth", "synchronize", "torchao_quantize",
           "weight_bytes"]

TORCHAO_INT4_GROUP = 64


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _storages(t: torch.Tensor) -> list[tuple[tuple[int, int, int], int]]:
    """((storage address, offset, numel), bytes) of a tensor, or of a wrapper subclass's
    inner tensors (torchao's quantized weights)."""
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return [s for n in names for s in _storages(getattr(t, n))]
    key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
    return [(key, t.numel() * t.element_size())]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step streams: the model's parameters, each storage once
    (tied weights once), without the input embedding table unless it is tied to the LM head
    (decoding gathers one row of it). Tensor subclasses count their inner tensors."""
    skip: set[tuple[int, int, int]] = set()
    try:
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        emb = head = None
    emb_w = getattr(emb, "weight", None)
    if isinstance(emb_w, torch.Tensor):
        emb_keys = {k for k, _ in _storages(emb_w)}
        head_w = getattr(head, "weight", None)
        head_keys = {k for k, _ in _storages(head_w)} if isinstance(head_w, torch.Tensor) else set()
        if not emb_keys & head_keys:
            skip = emb_keys
    seen: set[tuple[int, int, int]] = set(skip)
    total = 0
    for p in model.parameters():
        for key, nbytes in _storages(p):
            if key not in seen:
                seen.add(key)
                total += nbytes
    return total


def measure_bandwidth(mb: int = 256, repeats: int = 5,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Memory bandwidth in GB/s (1e9 bytes/s), medians over ``repeats``.

    ``read_GBps``: ``x.sum()`` over a float32 tensor of ``mb`` MiB, counting its bytes once.
    ``copy_GBps``: ``y.copy_(x)``, counting the bytes read plus the bytes written.
    Both tensors are written once first, so no timed run pays for first-touch page faults.
    """
    device = torch.device(device)
    nbytes = int(mb) * 2**20
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    reads, copies = [], []
    with torch.inference_mode():
        x.sum()
        y.copy_(x)
        synchronize(device)
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            x.sum()
            synchronize(device)
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            y.copy_(x)
            synchronize(device)
            copies.append(time.perf_counter() - t)
    del x, y
    read_s, copy_s = statistics.median(reads), statistics.median(copies)
    return {"method": f"float32 tensor of {mb} MiB: median of {max(1, repeats)} x.sum() "
                      "(bytes read) and y.copy_(x) (bytes read + written)",
            "bytes": nbytes, "repeats": max(1, repeats),
            "read_GBps": nbytes / read_s / 1e9, "copy_GBps": 2 * nbytes / copy_s / 1e9}


def torchao_quantize(net: torch.nn.Module, name: str) -> str:
    """Quantize ``net``'s linear weights in place with torchao; returns the config used."""
    try:
        import torchao
        from torchao.quantization import quantize_
    except ImportError as e:
        raise RuntimeError(f"{name} needs torchao, which is not importable ({e}); "
                           "pip install torchao") from e
    if name == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        config = Int8WeightOnlyConfig(set_inductor_config=False)
        label = "Int8WeightOnlyConfig(per-row)"
    else:
        try:  # the CPU int4 path (tinygemm _weight_int4pack_mm_for_cpu) in torchao >= 0.14
            from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        except ImportError:
            from torchao.quantization import Int4WeightOnlyConfig

            config = Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP,
                                          set_inductor_config=False)
            label = f"Int4WeightOnlyConfig(group_size={TORCHAO_INT4_GROUP})"
        else:
            config = PrototypeInt4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP,
                                                   set_inductor_config=False)
            label = f"PrototypeInt4WeightOnlyConfig(group_size={TORCHAO_INT4_GROUP})"
    quantize_(net, config)
    return f"torchao {torchao.__version__} {label}"
