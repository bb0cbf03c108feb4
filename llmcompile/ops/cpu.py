"""What this CPU can do, for kernel choices made at compile time.

Machines range from AVX2-only to AVX-512 with bf16 and AMX. The packed weight-only kernels
(``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``) take activations in bfloat16 or
float32: with native bf16 (AVX-512 BF16 / AMX) bf16 activations are several times faster; without
it (AVX2) the bf16 path emulates the conversions and float32 is the faster one (measured:
BENCHMARKS.md, "CPU-dependent kernel choice"). Inductor picks its own vector ISA the same way.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

__all__ = ["capability", "cpu_flags", "native_bf16", "packed_activation_dtype"]

_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


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


def native_bf16(flags: frozenset[str] | None = None, isa: str | None = None) -> bool:
    """True when the kernels can use bf16 instructions (AVX-512 BF16 or AMX, AVX-512 kernels)."""
    flags = cpu_flags() if flags is None else flags
    isa = capability() if isa is None else isa
    return isa.upper().startswith("AVX512") and bool(flags & _BF16_FLAGS)


def packed_activation_dtype(flags: frozenset[str] | None = None, isa: str | None = None
                            ) -> torch.dtype:
    """The activation dtype of the packed int8 / int4 CPU kernels on this machine
    (``LLMCOMPILE_PACKED_DTYPE=float32|bfloat16`` overrides)."""
    forced = os.environ.get("LLMCOMPILE_PACKED_DTYPE", "")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"LLMCOMPILE_PACKED_DTYPE={forced!r}: use float32 or bfloat16")
        return getattr(torch, forced)
    return torch.bfloat16 if native_bf16(flags, isa) else torch.float32
