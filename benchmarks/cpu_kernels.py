"""llmcompile's CPU decode matmuls alone, int4 against int8, one row (a decode step), on
SmolLM2's weight shapes (BENCHMARKS.md, "CPU decode"). Each shape cycles through enough
matrices (about 60 MB) that the weights come from memory, not from the caches.

    python benchmarks/cpu_kernels.py
"""

import time

import torch

from llmcompile.ops import kernels

SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]  # qkv, gate-up, down, LM head
GROUP = 64


def best_us(fn, count: int, repeats: int = 3) -> float:
    fn()  # first touch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best / count * 1e6


def main() -> None:
    if not kernels.available():
        raise SystemExit("llmcompile's CPU kernels are not available here (see the warning)")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    for n, k in SHAPES:
        count = max(2, 60_000_000 // (n * k))
        x = torch.randn(1, k)
        int4 = [(torch.randint(0, 256, (n, k // 2), dtype=torch.uint8),
                 torch.rand(n, k // GROUP).half(), torch.randn(n, k // GROUP).half())
                for _ in range(count)]
        int8 = [(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n))
                for _ in range(count)]

        def run4(x=x, weights=int4):
            for q, s, lo in weights:
                torch.ops.llmcompile_cpu.linear_int4(x, q, s, lo, GROUP)

        def run8(x=x, weights=int8):
            for q, s in weights:
                torch.ops.llmcompile_cpu.linear_int8(x, q, s)

        t4, t8 = best_us(run4, count), best_us(run8, count)
        b4, b8 = n * k * (0.5 + 4 / GROUP), n * k  # bytes streamed: nibbles + fp16 scale, low
        print(f"{n:>6} x {k:<5} int4 {t4:7.1f} us ({b4 / t4 / 1e3:5.1f} GB/s)   "
              f"int8 {t8:7.1f} us ({b8 / t8 / 1e3:5.1f} GB/s)")


if __name__ == "__main__":
    main()
