"""The kernels' AVX2 paths on an AVX-512 machine: the kernel tests again, in a subprocess whose
kernels are built with ``LLMCOMPILE_CPU_MARCH=x86-64-v3`` (on an AVX2-only machine the default
run already tests those paths)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcompile.ops import cpu

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.skipif(not {"avx512f", "avx2", "fma"} <= set(cpu.cpu_flags()),
                    reason="needs an AVX-512 machine (AVX2-only machines test these by default)")
def test_the_avx2_build_passes_the_kernel_tests(tmp_path):
    env = dict(os.environ, LLMCOMPILE_CPU_MARCH="x86-64-v3",
               LLMCOMPILE_CACHE_DIR=str(tmp_path / "llmcompile"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    width = subprocess.run([sys.executable, "-c", "from llmcompile.ops import kernels; "
                            "print(kernels.vector_width())"], env=env, cwd=ROOT,
                           capture_output=True, text=True, check=True)
    assert width.stdout.split()[-1] == "8"  # the AVX2 build, not the native one
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          "tests/lower/test_gemv.py", "tests/lower/test_decode_attention.py"],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:]
