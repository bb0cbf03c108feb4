"""What this CPU can do, for kernel choices made at compile time.

Machines range from AVX2-only to AVX-512 with bf16 and AMX. The packed weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) take activations in bfloat16 or
float32. Measured on both kernel ISAs (``ATEN_CPU_CAPABILITY=avx2`` and the AVX-512 build on an
AVX-512 BF16 machine; BENCHMARKS.md, "CPU-dependent kernel choice"): bfloat16 activations are
10-60x faster than float32 ones on *both* (the float32 path is a scalar loop), so bfloat16 is
the choice for every ISA with vector kernels. Where ATen has none (``DEFAULT``), the packed
kernels would be slower than a dense float32 matmul: :func:`packed_kernels_pay` says so and the
quantize pass declines with that reason. Inductor picks its own vector ISA from the CPU too.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch.utils.weak import WeakIdKeyDictionary

__all__ = ["capability", "cpu_flags", "describe", "packed_activation_dtype",
           "packed_kernels_pay"]

_VECTOR_ISAS = ("AVX2", "AVX512")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def capability() -> str:
    """The vector ISA ATen's CPU kernels run with here (``AVX512``, ``AVX2``, ``DEFAULT``...);
    ``ATEN_CPU_CAPABILITY`` lowers it."""
    return torch.backends.cpu.get_cpu_capability()


def describe() -> str:
    """One line for benchmark tables: kernel ISA and the flags that matter for LLM kernels."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")
    return f"ATen {capability()}; flags: " + " ".join(f for f in wanted if f in cpu_flags())


def packed_kernels_pay(isa: str | None = None) -> bool:
    """True where ATen has vector kernels for the packed int8 / int4 matmuls."""
    isa = capability() if isa is None else isa
    return isa.upper().startswith(_VECTOR_ISAS)


def packed_activation_dtype() -> torch.dtype:
    """The activation dtype of the packed int8 / int4 CPU kernels: bfloat16 (measured fastest on
    AVX2 and AVX-512 kernels); ``LLMCOMPILE_PACKED_DTYPE=float32|bfloat16`` overrides."""
    forced = os.environ.get("LLMCOMPILE_PACKED_DTYPE", "")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"LLMCOMPILE_PACKED_DTYPE={forced!r}: use float32 or bfloat16")
        return getattr(torch, forced)
    return torch.bfloat16


#: ATen int4 pack -> the int4 decode kernel's layout (nibbles, scale, low), while the pack
#: lives: filled by the quantize pass from its stored artifacts (no unpacking) or by
#: :func:`llmcompile.lower.gemv.unpack_int4`; decode graphs of one model share them
INT4_LAYOUTS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def int4_kernel_layout(q: torch.Tensor, scales_zeros: torch.Tensor, group_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int4 decode kernel's layout of values ``q`` [N, K] (0..15) and ATen's
    ``scales_zeros`` [K/G, N, 2] (``w = (q - 8) * scale + zero``): two values of a group per
    byte (first half low nibble), float16 scale and ``low = zero - 8 * scale`` [N, K/G]."""
    n, k = q.shape
    groups = q.view(n, k // group_size, group_size)
    half = group_size // 2
    nib = (groups[..., :half] | (groups[..., half:] << 4)).reshape(n, k // 2).contiguous()
    sz = scales_zeros.float()
    # float16: 4 bytes a group of 64 against 8 in float32; its rounding (2^-11 relative) is
    # far below the int4 step
    scale = sz[..., 0].T.contiguous().half()
    low = (sz[..., 1] - 8.0 * sz[..., 0]).T.contiguous().half()
    return nib, scale, low
