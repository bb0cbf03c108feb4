"""Where compile time goes: wall seconds per stage, summed over the process.

    with stage("capture"): ...          # nested stages are subtracted from the outer one
    count("quant artifacts loaded")     # events without a duration
    print(format_table())               # LLMCOMPILE_PROFILE=1 prints it after each
                                        # llmcompile.generate call that compiled, and at exit

Stages (in the order a graph meets them): ``capture``, ``rewrite`` (the recipe's passes),
``calibration`` (the model on calibration text), ``solve`` (AWQ / GPTQ / rounding and
packing), ``lower`` (llmcompile's own lowerings), ``inductor`` (``compile_fx``: AOTAutograd,
code generation, C++ builds, or loading them from torch's caches) and ``kernel build`` (the
CPU kernels, once per machine). Torch's cache hits and misses are listed beside them.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import time

from .. import _compat

__all__ = ["count", "format_table", "profiling", "report", "stage", "table"]

_seconds: dict[str, float] = {}
_counts: dict[str, int] = {}
_stack: list[list[float]] = []  # per open stage: [start, seconds spent in nested stages]
_ORDER = ("capture", "rewrite", "calibration", "solve", "lower", "inductor", "kernel build")
_printed: dict[str, float] = {}


@contextlib.contextmanager
def stage(name: str):
    """Add the block's wall time, less that of stages nested in it, to ``name``."""
    _stack.append([time.perf_counter(), 0.0])
    try:
        yield
    finally:
        start, nested = _stack.pop()
        spent = time.perf_counter() - start
        _seconds[name] = _seconds.get(name, 0.0) + spent - nested
        _counts[name] = _counts.get(name, 0) + 1
        if _stack:
            _stack[-1][1] += spent


def count(name: str, n: int = 1) -> None:
    _counts[name] = _counts.get(name, 0) + n


def table() -> dict[str, dict[str, float]]:
    """``{stage: {"seconds": s, "count": n}}`` so far in this process (events: count only)."""
    names = [*[n for n in _ORDER if n in _counts], *sorted(set(_counts) - set(_ORDER))]
    out = {n: {"seconds": round(_seconds[n], 3), "count": _counts[n]} if n in _seconds
           else {"count": _counts[n]} for n in names}
    out.update({k: {"count": v} for k, v in _compat.cache_counters().items() if v})
    return out


def format_table() -> str:
    lines = ["llmcompile compile stages (this process):"]
    for name, row in table().items():
        secs = f"{row['seconds']:9.2f} s" if "seconds" in row else " " * 11
        lines.append(f"  {name:<28}{secs}  x{row['count']}")
    return "\n".join(lines)


def profiling() -> bool:
    return os.environ.get("LLMCOMPILE_PROFILE", "") not in ("", "0")


def report() -> None:
    """Print the table to stderr under ``LLMCOMPILE_PROFILE=1`` if anything was timed since
    it was last printed."""
    if profiling() and _seconds != _printed:
        print(format_table(), file=sys.stderr)
        _printed.clear()
        _printed.update(_seconds)


atexit.register(report)
