"""Attention of one decode step on CPU, four ways, inside one compiled graph of 30 layers
(BENCHMARKS.md, "CPU decode"): SmolLM2's shapes after grouping query heads by KV head
(3 KV heads x 3 query rows, 256 cached positions, head dim 64).

    python benchmarks/decode_attention.py

* flash: ``F.scaled_dot_product_attention`` (Inductor calls the CPU flash kernel),
* matmul: ``softmax(q @ kᵀ * c + mask) @ v``,
* reductions: the same as two broadcast-multiply + sum reductions, which Inductor fuses into
  one loop over K and one over V (``llmcompile.attention``'s reference for a decode step),
* kernel: ``llmcompile_cpu.decode_attention`` (what a decode step runs where llmcompile's CPU
  kernels build): it skips the masked positions without reading them.
"""

import os
import tempfile
import time

import torch
import torch.nn.functional as F

from llmcompile.ops import kernels

LAYERS, KV_HEADS, ROWS, POSITIONS, DIM = 30, 3, 3, 256, 64


def flash(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=DIM ** -0.5)


def matmul(q, k, v, mask):
    s = torch.matmul(q, k.transpose(-1, -2)) * DIM ** -0.5 + mask
    return torch.matmul(torch.softmax(s, -1), v)


def reductions(q, k, v, mask):
    s = (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1) * DIM ** -0.5 + mask
    return (torch.softmax(s, -1).unsqueeze(-1) * v.unsqueeze(-3)).sum(-2)


def kernel(q, k, v, mask):
    return torch.ops.llmcompile_cpu.decode_attention(q, k, v, mask, DIM ** -0.5, False)


def layers(fn):
    def run(q, ks, vs, mask):
        x = q
        for k, v in zip(ks, vs):
            x = fn(x, k, v, mask) + q
        return x
    return run


def main() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="llmc-attn-"))
    torch.set_num_threads(2)
    torch.manual_seed(0)
    q = torch.randn(1, KV_HEADS, ROWS, DIM)
    ks = [torch.randn(1, KV_HEADS, POSITIONS, DIM) for _ in range(LAYERS)]
    vs = [torch.randn(1, KV_HEADS, POSITIONS, DIM) for _ in range(LAYERS)]
    mask = torch.zeros(1, 1, ROWS, POSITIONS)
    mask[..., 200:] = float("-inf")  # 200 positions filled
    expected = layers(flash)(q, ks, vs, mask)
    variants = [("flash", flash), ("matmul", matmul), ("reductions", reductions)]
    if kernels.available():
        variants.append(("kernel", kernel))
    for name, fn in variants:
        compiled = torch.compile(layers(fn), dynamic=False)
        error = (compiled(q, ks, vs, mask) - expected).abs().max().item()
        for _ in range(50):  # warm up: first-touch memory is slow
            compiled(q, ks, vs, mask)
        start, calls = time.perf_counter(), 300
        for _ in range(calls):
            compiled(q, ks, vs, mask)
        per_layer = (time.perf_counter() - start) / calls / LAYERS * 1e6
        print(f"{name:<11} {per_layer:6.1f} us per layer   max error {error:.1e}")


if __name__ == "__main__":
    main()
