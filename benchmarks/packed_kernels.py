"""Packed int8 / int4 CPU matmuls with bfloat16 vs float32 activations (BENCHMARKS.md,
"CPU-dependent kernel choice"). Decode-shaped (M = 1) and prefill-shaped (M = 128) calls of
SmolLM2's gate/up width; run once as is and once with ATEN_CPU_CAPABILITY=avx2.

    python benchmarks/packed_kernels.py
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/packed_kernels.py
"""

import time

import torch

from llmcompile import quant
from llmcompile.ops import cpu

N, K, GROUP = 1536, 576, 64


def mean_us(fn, *args, calls: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):  # first-touch memory is slow: warm up before timing
        fn(*args)
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    torch.set_num_threads(2)
    print(cpu.describe())
    torch.manual_seed(0)
    w = torch.randn(N, K)
    q8, s8 = quant.quantize_int8(w)
    q4 = quant.quantize_int4(w, GROUP)
    for m in (1, 128):
        x = torch.randn(m, K)
        for dtype in (torch.bfloat16, torch.float32):
            xs, scales = x.to(dtype), s8.to(dtype)
            packed, sz = q4.pack_cpu(dtype)
            t8 = mean_us(torch.ops.aten._weight_int8pack_mm, xs, q8, scales)
            t4 = mean_us(torch.ops.aten._weight_int4pack_mm_for_cpu, xs, packed, GROUP, sz)
            dense = mean_us(torch.mm, xs, w.T) if dtype == torch.float32 else float("nan")
            print(f"M={m:4d} {str(dtype):15s} int8 {t8:9.1f} us   int4 {t4:9.1f} us   "
                  f"dense fp32 {dense:9.1f} us")


if __name__ == "__main__":
    main()
