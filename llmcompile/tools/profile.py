"""Where a decode step's time goes: ``llmcompile profile MODEL --recipe R``.

Greedy decoding runs through :func:`llmcompile.generate`'s compiled step (the graphs are
compiled with Inductor's per-kernel profiling on, so its generated C++ kernels show up by name)
under ``torch.profiler`` on the CPU. The mean step time is split into:

* **float matmuls** and **packed int8 / int4 matmuls** (the linear layers: ATen's or
  llmcompile's own decode kernels, ``llmcompile_cpu::linear_*``),
* **LM head** (the matmul whose output is the vocabulary, whatever its format),
* **attention** (SDPA, FlexAttention or a fused attention kernel),
* **cache writes** (Inductor kernels whose origin is the KV cache's ``index_copy`` / ``copy``),
* **other generated kernels** (norms, rotary, SiLU-mul, casts, the embedding gather...),
* **other ATen ops**, and
* **overhead**: the measured step time (without the profiler) minus all of the above. That is
  the Python wrapper around the kernels, Dynamo's guards, transformers' output objects, the
  argmax and the loop.

The split is taken with Inductor's Python wrapper: ``generate`` itself calls a static graph's
kernels from C++ (``cpp_wrapper``) on a CPU, but those C shims call ATen without the shapes the
profiler needs to tell the LM head from the other matmuls. The kernels are the same; the
overhead line is the Python wrapper's (``LLMCOMPILE_CPP_WRAPPER=0 llmcompile bench`` measures
``generate`` the same way).

``hf_generate_overhead`` times Hugging Face ``generate`` on the same compiled forward, so the
cost of its per-token logits processing and bookkeeping is measured beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..registry import resolve_recipe

__all__ = ["CLASSES", "StepSplit", "classify", "hf_generate_overhead", "profile_decode"]

CLASSES = ("float matmul", "packed int8 matmul", "packed int4 matmul", "LM head", "attention",
           "cache writes", "other generated kernels", "other ATen ops", "overhead")

_FLOAT_MM = {"aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul",
             "mkldnn::_linear_pointwise", "aten::_mkl_linear", "mkl::_mkl_linear"}
_ATTENTION = re.compile(r"scaled_dot_product|flex_attention|flash_attention|_sdpa|attention")
_CACHE = re.compile(r"index_copy|index_put|slice_scatter|scatter")
_GENERATED = re.compile(r"^graph_\d+_cpp_|^cpp_fused|^kernel_cpp")
#: containers and Python-level frames whose time is their children's
_CONTAINERS = re.compile(r"^(## |Torch-Compiled Region|CompiledFunction|"
                         r"aten::(empty|as_strided|view|reshape|t|transpose|expand|select|"
                         r"slice|unsqueeze|squeeze|_unsafe_view|detach|alias|resolve_conj|"
                         r"resolve_neg|lift_fresh))")


def classify(name: str, shapes: Iterable[Iterable[int]] = (), vocab: int = 0) -> str | None:
    """The class of one profiled op (``None``: a container or a view, not counted)."""
    if _CONTAINERS.match(name) or name.startswith("cudaLaunch"):
        return None
    dims = {d for s in shapes for d in s}
    is_mm = (name in _FLOAT_MM or "_weight_int8pack_mm" in name or "_weight_int4pack_mm" in name
             or "matmul_nbits" in name or "int4_linear" in name or "int8_linear" in name
             or name.startswith("llmcompile_cpu::linear"))
    if is_mm and vocab and vocab in dims:
        return "LM head"
    if "_weight_int8pack_mm" in name or name == "llmcompile_cpu::linear_int8":
        return "packed int8 matmul"
    if "_weight_int4pack_mm" in name or name == "llmcompile_cpu::linear_int4":
        return "packed int4 matmul"
    if name in _FLOAT_MM or name == "llmcompile_cpu::linear_f32":
        return "float matmul"
    if _ATTENTION.search(name):
        return "attention"
    if _GENERATED.search(name):
        if "softmax" in name:  # a fused attention (decode attention's reductions)
            return "attention"
        return "cache writes" if _CACHE.search(name) else "other generated kernels"
    if name.startswith("aten::"):
        return "cache writes" if _CACHE.search(name) else "other ATen ops"
    return None


@dataclass
class StepSplit:
    """Mean milliseconds per decode step, by class."""

    recipe: str
    step_ms: float
    tokens_per_s: float
    ms: dict[str, float] = field(default_factory=dict)
    kernels: list[tuple[str, str, float]] = field(default_factory=list)  # (class, name, ms)
    hf_step_ms: float | None = None

    def format(self, top: int = 0) -> str:
        lines = [f"recipe {self.recipe}: {self.step_ms:.2f} ms / step "
                 f"({self.tokens_per_s:.1f} tok/s)",
                 f"  {'class':<26} {'ms/step':>8} {'share':>6}"]
        for name in CLASSES:
            ms = self.ms.get(name, 0.0)
            if ms or name == "overhead":
                lines.append(f"  {name:<26} {ms:8.3f} {ms / self.step_ms:6.1%}")
        if self.hf_step_ms is not None:
            lines.append(f"  HF generate on the same compiled forward: {self.hf_step_ms:.2f} "
                         f"ms / token (+{self.hf_step_ms - self.step_ms:.2f} ms)")
        for cls, name, ms in self.kernels[:top]:
            lines.append(f"    {ms:8.3f}  {cls:<22} {name[:70]}")
        return "\n".join(lines)


@contextlib.contextmanager
def _kernel_names():
    """Compile with Inductor's per-kernel profiling (its C++ kernels get profiler events)."""
    from torch._inductor import config

    with config.patch({"cpp.enable_kernel_profile": True}):
        yield


def profile_decode(model: Any, recipe: Any = "default", *, tokenizer: Any = None,
                   prompt_len: int = 128, steps: int = 64, repeats: int = 3) -> StepSplit:
    """Profile ``steps`` greedy decode steps of ``model`` under ``recipe`` (see module doc)."""
    from ..deploy.generate import Session

    recipe = resolve_recipe(recipe)
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    prompt = torch.randint(100, min(vocab, 20_000), (1, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    with _kernel_names():
        # not the shared session: compiled with kernel names, and with the Python wrapper (the
        # C shims of cpp_wrapper call ATen without profiler shapes, so no LM head by shape)
        run = Session(model, recipe, tokenizer, cpp_wrapper=False)
        run.generate(prompt, steps)  # compiles; then time without the profiler
        times = []
        for _ in range(repeats):
            _, stats = run.generate(prompt, steps)
            times.append(stats.decode_s / max(1, stats.new_tokens - 1))
        step_s = min(times)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    record_shapes=True) as prof:
            _, stats = run.generate(prompt, steps)
    # decode steps only: the prefill's events are subtracted by a prefill-only profile
    with _kernel_names(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as pre:
        run.generate(prompt, 1)
    n = max(1, stats.new_tokens - 1)
    # subtracted per (op, input shapes): a prefill op (more rows) never eats into the time of
    # the same op at decode shapes, whatever the noise between the two runs
    totals: dict[tuple[str, str, str], float] = {}
    for sign, p in ((1.0, prof), (-1.0, pre)):
        for e in p.key_averages(group_by_input_shape=True):
            cls = classify(e.key, e.input_shapes or (), vocab)
            if cls is not None:
                key = (cls, e.key, str(e.input_shapes))
                totals[key] = totals.get(key, 0.0) + sign * e.self_cpu_time_total / 1e3
    split = StepSplit(recipe.name, step_s * 1e3, 1.0 / step_s)
    per_kernel: dict[tuple[str, str], float] = {}
    for (cls, name, _), ms in totals.items():
        per = max(0.0, ms / n)
        split.ms[cls] = split.ms.get(cls, 0.0) + per
        per_kernel[(cls, name)] = per_kernel.get((cls, name), 0.0) + per
    split.kernels.extend((cls, name, ms) for (cls, name), ms in per_kernel.items())
    split.kernels.sort(key=lambda k: -k[2])
    split.ms["overhead"] = max(0.0, split.step_ms - sum(split.ms.values()))
    return split


@torch.no_grad()
def hf_generate_overhead(model: Any, recipe: Any, split: StepSplit, *, tokenizer: Any = None,
                         prompt_len: int = 128, steps: int = 64) -> float:
    """Per-token milliseconds of Hugging Face ``generate`` (static cache, greedy) with
    ``model.forward`` compiled by llmcompile under ``recipe``; stored in ``split.hf_step_ms``.

    Measured as the difference between ``steps + 1`` and 1 new tokens, so prefill cancels."""
    recipe = resolve_recipe(recipe)
    options: dict[str, Any] = {"recipe": recipe, "fallback": False}
    if tokenizer is not None:
        options["tokenizer"] = tokenizer
    vocab = int(model.config.get_text_config(decoder=True).vocab_size)
    prompt = torch.randint(100, min(vocab, 20_000), (1, prompt_len),
                           generator=torch.Generator().manual_seed(0))
    original = model.forward
    model.forward = torch.compile(original, backend="llmcompile", options=options)
    try:
        def run(new: int) -> float:
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           cache_implementation="static", pad_token_id=0)
            return time.perf_counter() - start
        for _ in range(2):  # the static cache initialises lazily: one more compile
            run(steps + 1)
        long = min(run(steps + 1) for _ in range(2))
        short = min(run(1) for _ in range(2))
    finally:
        model.forward = original
    split.hf_step_ms = (long - short) / steps * 1e3
    return split.hf_step_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="'smollm2', a tiny architecture name or a transformers folder")
    p.add_argument("--recipe", nargs="+", default=["default"],
                   help="preset names or .toml paths, profiled one after another")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=64, help="decode steps profiled")
    p.add_argument("--top", type=int, default=8, help="slowest ops listed per recipe")
    p.add_argument("--hf", action="store_true",
                   help="also time HF generate on the same compiled forward")


def main(args: argparse.Namespace) -> int:
    from .. import _compat
    from ..ops import cpu
    from .explain import load_model

    model = load_model(args.model)
    tokenizer = _compat.tokenizer_path(model)
    print(cpu.describe())
    for name in args.recipe:
        split = profile_decode(model, name, tokenizer=tokenizer, prompt_len=args.prompt_len,
                               steps=args.steps)
        if args.hf:
            hf_generate_overhead(model, name, split, tokenizer=tokenizer,
                                 prompt_len=args.prompt_len, steps=args.steps)
        print(split.format(top=args.top), flush=True)
    return 0
