"""``llmcompile machine``: measure this machine's roofline once and cache it.

What is measured (about half a minute, most of it compiling two small models):

* read bandwidth: ``x.sum()`` over a 256 MiB float32 tensor (:func:`measure_bandwidth`);
* sustained float32 GEMM FLOP/s: ``a @ b`` with 1024 x 1024 matrices;
* per one-token matmul kind (a float32 ``F.linear`` and the int8 / int4 packed kernels the
  ``quantize_weights`` pass emits, activations in the dtype it chooses for this CPU): its
  time against weight bytes, 64 KiB to 64 MiB (float32 sizes), each size cycling through
  more copies than the caches hold;
* overhead outside kernels: decode steps of a tiny llama with 1 and 8 layers compiled by
  llmcompile (``default`` recipe), whose kernels take next to no time; the two steps fit
  ``call_s + launches x launch_s`` (launches counted by the cost model).

The result is cached as JSON in ``$LLMCOMPILE_CACHE_DIR`` (default
``$XDG_CACHE_HOME/llmcompile`` or ``~/.cache/llmcompile``), keyed by CPU, threads and torch
version; ``llmcompile machine --remeasure`` measures again.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..analysis.roofline import Machine, predict
from ..ops import cpu
from .measure import measure_bandwidth

__all__ = ["add_arguments", "cache_path", "load_machine", "main", "measure_machine"]


def cache_path() -> Path:
    """Where this machine's profile is cached (one file per CPU, threads and torch)."""
    root = os.environ.get("LLMCOMPILE_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmcompile"
    key = f"{_cpu_name()}|{cpu.capability()}|{torch.get_num_threads()}|{torch.__version__}"
    return Path(root) / f"machine-{hashlib.sha256(key.encode()).hexdigest()[:12]}.json"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _median_seconds(fn: Callable[..., object], repeats: int, *args) -> float:
    fn(*args)  # first touch and lazy initialisation are not timed
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _gemm_flops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        return 2 * n**3 / _median_seconds(torch.matmul, repeats, a, b)


_WIDTHS = (16, 128, 512, 2048, 8192, 16384)  # output rows; K = 1024: 64 KiB ... 64 MiB float32
_POOL_BYTES = 256 * 2**20  # more than any last-level cache: every call reads from memory


def _weight_rates(repeats: int = 5) -> tuple[dict[str, float], dict[str, list]]:
    """Per matmul kind, the streaming rate (bytes/s, slope of the two largest sizes) and the
    measured ``[bytes, seconds]`` of one-token matmuls over weights of 64 KiB to 64 MiB
    (float32 sizes). Each size cycles through copies of its weights that together exceed the
    caches, as a model's layers do, so no call finds its weights cached."""
    from .. import ops
    from ..quant.formats import quantize_int4, quantize_int8

    k, act = 1024, cpu.packed_activation_dtype()
    x = torch.randn(1, k)
    points: dict[str, list[tuple[int, float]]] = {"float32": [], "int8": [], "int4": []}
    with torch.inference_mode():
        for n in _WIDTHS:
            w = torch.randn(n, k)
            q, scale = quantize_int8(w)
            packed, sz = quantize_int4(w, 64).pack_cpu(act)
            cases = {"float32": (F.linear, (w,)), "int8": (ops.int8_linear, (q, scale.to(act))),
                     "int4": (ops.int4_linear, (packed, sz, 64))}
            for kind, (fn, weights) in cases.items():
                nbytes = _nbytes(*(t for t in weights if isinstance(t, torch.Tensor)))
                points[kind].append((nbytes, _stream_seconds(fn, x, weights, nbytes, repeats)))
    rates = {k: (p[-1][0] - p[-2][0]) / max(p[-1][1] - p[-2][1], 1e-12)
             for k, p in points.items()}
    return rates, {k: [list(x) for x in p] for k, p in points.items()}


def _stream_seconds(fn: Callable, x: torch.Tensor, weights: tuple, nbytes: int,
                    repeats: int) -> float:
    """Seconds per call of ``fn(x, *weights)`` over a pool of copies of ``weights``."""
    copies = max(2, _POOL_BYTES // nbytes)
    pool = [tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in weights)
            for _ in range(copies)]

    def sweep() -> None:
        for args in pool:
            fn(x, *args)

    return _median_seconds(sweep, repeats) / copies


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _decode_step(layers: int, progress: Callable[[str], None]) -> tuple[float, object]:
    """(median seconds of a decode step, the decode graph's cost) of a tiny llama."""
    from ..backend import collect_reports
    from .bench_peers import compile_config
    from .bench_runner import Runner
    from .models import tiny_model

    net = tiny_model("llama", num_hidden_layers=layers)
    prompt = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    progress(f"  compiling a {layers}-layer tiny llama (default recipe)")
    with collect_reports() as reports, torch.no_grad():
        runner = Runner(compile_config("default", "recipe", net, True), net, prompt, 24,
                        torch.float32)
        runner.run()
    with torch.no_grad():
        runner.run()
        steps = [statistics.median(runner.run()[1]) for _ in range(5)]
    costs = [r.cost.after for r in reports if r.cost is not None]
    if not costs:
        raise RuntimeError("the tiny model's decode graph has no cost report")
    return statistics.median(steps), costs[-1]  # the decode graph compiles last


def _fit_overhead(machine: Machine, progress: Callable[[str], None]) -> tuple[float, float]:
    """``(call_s, launch_s)`` from decode steps of two tiny models of 1 and 8 layers."""
    points = []
    for layers in (1, 8):
        seconds, cost = _decode_step(layers, progress)
        kernels = predict(cost, {}, machine)
        points.append((cost.launches, seconds - kernels.compute_s - kernels.memory_s))
    (l1, t1), (l2, t2) = points
    launch_s = max((t2 - t1) / (l2 - l1), 0.0)
    return max(t1 - launch_s * l1, 0.0), launch_s


def measure_machine(progress: Callable[[str], None] = print) -> Machine:
    """Measure this machine (about half a minute)."""
    progress("measuring memory read bandwidth")
    bandwidth = measure_bandwidth(256, 5)["read_GBps"] * 1e9
    progress("measuring float32 GEMM throughput")
    flops = _gemm_flops()
    progress("measuring one-token matmul kernels (float32, int8, int4)")
    rates, curve = _weight_rates()
    base = Machine(bandwidth, flops, rates, curve)
    progress("fitting the per-call and per-kernel overhead from two tiny models")
    call_s, launch_s = _fit_overhead(base, progress)
    description = (f"{_cpu_name()}, {cpu.describe()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}")
    return Machine(bandwidth, flops, rates, curve, launch_s, call_s, description)


def load_machine(remeasure: bool = False, progress: Callable[[str], None] = print) -> Machine:
    """This machine's profile: from the cache, or measured (and cached) when missing."""
    path = cache_path()
    if path.is_file() and not remeasure:
        try:
            return Machine.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError):
            progress(f"ignoring an unreadable machine profile {path}")
    found = measure_machine(progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(found.to_dict(), indent=2))
    progress(f"saved {path}")
    return found


def format_machine(m: Machine) -> str:
    rates = ", ".join(f"{k} {v / 1e9:.1f} GB/s (smallest {_floor(m, k) * 1e6:.0f} us)"
                      for k, v in m.weight_bps.items())
    return (f"{m.description}\n"
            f"  read bandwidth     {m.read_bps / 1e9:.1f} GB/s\n"
            f"  float32 GEMM       {m.gemm_flops / 1e9:.1f} GFLOP/s\n"
            f"  one-token matmuls  {rates}\n"
            f"  overhead           {m.call_s * 1e6:.0f} us per call + "
            f"{m.launch_s * 1e6:.1f} us per kernel")


def _floor(m: Machine, kind: str) -> float:
    curve = m.matmul_curve.get(kind)
    return curve[0][1] if curve else 0.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--remeasure", action="store_true", help="measure again, replacing the "
                   "cached profile")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")


def main(args: argparse.Namespace) -> int:
    found = load_machine(args.remeasure, progress=lambda s: print(s, flush=True))
    print(json.dumps(found.to_dict(), indent=2) if args.json else format_machine(found))
    print(f"(cached in {cache_path()})")
    return 0
