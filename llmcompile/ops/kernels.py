"""llmcompile's own CPU kernels (``torch.ops.llmcompile_cpu.*``), built at first use.

Decode multiplies one token, or a few (speculative verification), by every weight matrix: it is
bound by how fast weights stream from memory. ATen's float32 GEMV and packed int8 matmul reach
a third to a half of the read bandwidth at one row (BENCHMARKS.md, "CPU decode"); the loops in
``csrc/gemv.cpp`` read each weight once, convert it in registers (AVX-512 or AVX2, chosen by
``-march=native`` when built) and keep up to four rows' accumulators. ``csrc/attention.cpp``
attends a few query rows over a KV cache, reading only the keys the mask keeps (a static cache
costs the positions in use, not its length).

:func:`load` compiles them with ``torch.utils.cpp_extension`` (the C++ compiler Inductor uses;
15-30 s, once per machine: the build is cached under ``$LLMCOMPILE_CACHE_DIR`` or
``~/.cache/llmcompile``, keyed by the source, torch's version and the CPU's flags).
``LLMCOMPILE_CPU_KERNELS=0`` turns them off; ``LLMCOMPILE_CPU_MARCH`` builds them for another
``-march`` than ``native`` (e.g. ``x86-64-v3``: the AVX2 paths on an AVX-512 machine, for tests
and AVX2 measurements); where the build fails, decode matmuls stay on ATen
and a warning says why. The ops are registered in C++, so Inductor's C++ wrapper calls them
without Python. :mod:`llmcompile.lower.gemv` puts them in decode graphs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

from ..core import stages
from ..core.cache import cache_root
from . import cpu

__all__ = ["MAX_ROWS", "available", "build_folder", "load", "vector_width"]

log = logging.getLogger("llmcompile")

#: decode graphs with at most this many rows of activations use the kernels (prefill: ATen)
MAX_ROWS = 16
_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "gemv.cpp", _CSRC / "attention.cpp")
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build_dir() -> tuple[str, Path]:
    key = hashlib.sha256()
    for source in (*_SOURCES, _CSRC / "vec.h"):
        key.update(source.read_bytes())
    key.update(torch.__version__.encode())
    key.update(" ".join(sorted(cpu.cpu_flags())).encode())
    key.update(_march().encode())
    name = f"llmcompile_cpu_{key.hexdigest()[:12]}"
    return name, cache_root() / "kernels" / name


def build_folder() -> Path:
    """Where this machine's build of the kernels lives (``save_artifacts`` ships it)."""
    return _build_dir()[1]


def _march() -> str:
    return os.environ.get("LLMCOMPILE_CPU_MARCH") or "native"


def _register_fakes() -> None:
    lib = "llmcompile_cpu::"

    @torch.library.register_fake(lib + "linear_f32")
    def _(x, w):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(lib + "linear_int8")
    def _(x, w, scales):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake(lib + "linear_int4")
    def _(x, q, scale, low, group_size):
        return x.new_empty(x.shape[0], q.shape[0])

    @torch.library.register_fake(lib + "decode_attention")
    def _(q, k, v, mask, scale, causal):
        return q.new_empty(*q.shape[:-1], v.shape[-1])


def load() -> bool:
    """Build (first time on this machine) and load the kernels; False where they are off or the
    build failed (logged once)."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        _state["ok"] = False
        if os.environ.get("LLMCOMPILE_CPU_KERNELS", "1") == "0":
            return False
        if not cpu.packed_kernels_pay():  # no vector ISA: nothing to gain over ATen
            return False
        name, where = _build_dir()
        built = (where / f"{name}.so").exists()
        if not built:
            log.warning("llmcompile: building the CPU decode kernels (once per machine, "
                        "15-30 s) in %s", where)
        try:
            where.mkdir(parents=True, exist_ok=True)
            with stages.stage("kernel build" if not built else "kernel load"):
                _build(name, where)
            _register_fakes()
        except Exception as e:  # no compiler, no headers...: ATen keeps the decode matmuls
            log.warning("llmcompile: CPU decode kernels unavailable, decode matmuls stay on "
                        "ATen (%s: %s)", type(e).__name__, str(e).splitlines()[0][:200])
            return False
        _state["ok"] = True
        return True


def _build(name: str, where: Path) -> None:
    from torch.utils import cpp_extension

    cpp_extension.load(name, [str(s) for s in _SOURCES], build_directory=str(where),
                       extra_cflags=["-O3", f"-march={_march()}", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)


def available() -> bool:
    """Whether the kernels are loaded (builds them on first call; see :func:`load`)."""
    return load()


def vector_width() -> int:
    """Floats per vector register the kernels were built for (16: AVX-512, 8: AVX2)."""
    if not load():
        raise RuntimeError("llmcompile CPU kernels are not available")
    return int(torch.ops.llmcompile_cpu.vector_width())
