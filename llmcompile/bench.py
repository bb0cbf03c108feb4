"""``llmcompile bench``: prefill latency and decode speed, side by side, in one process.

For each configuration (the ``eager`` and ``inductor`` baselines and any llmcompile recipes) the
bench takes a fresh copy of the model, compiles ``model.forward`` (``dynamic=False``: the prefill
of length P and the one-token decode step are two static specializations, compiled once each),
and drives it by hand with a transformers ``StaticCache`` of ``prompt_len + new_tokens`` slots:

* prefill (TTFT): one forward over the prompt with ``cache_position = arange(P)``, then the
  argmax of the last logits (the first new token);
* decode (TPOT): ``new_tokens - 1`` one-token forwards, each fed the previous greedy token and
  timed on its own (forward + argmax).

Every configuration first runs ``warmup`` (at least 2) untimed full generations (compilation,
first-touch memory, a possible second specialization), then ``repeats`` timed ones. Reported:
the median prefill time over repeats, the median per-token decode latency over all timed steps,
and ``decode_tokens_per_s = 1 / median step latency``. ``compile_s`` is the wall time of the
warm-up runs minus ``warmup`` times the median timed run (clamped at 0): time spent compiling
and warming up, beyond what running would have cost (``warmup_overhead_s`` holds the same
figure for every configuration; eager's ``compile_s`` is 0). Dynamo's graph count is checked around
the timed runs; a graph compiled while timing is a recompile, recorded and warned about.

Greedy tokens of each configuration are compared with eager's (``tokens_match``); the bench
records the result and never asserts it.

Memory bandwidth is measured in the same process, before the models run: the median over
repeats of ``x.sum()`` over a float32 tensor of ``bandwidth_mb`` MiB (bytes read / seconds:
``read_GBps``), and of ``y.copy_(x)`` (2 x bytes / seconds: ``copy_GBps``). Decode streams the
weights read-only, so Model Bandwidth Utilization uses the read figure::

    MBU = weight_bytes x decode_tokens_per_s / (read_GBps x 1e9)

``weight_bytes`` counts the model's parameters once each (tied embeddings once) at the
benchmark dtype; a quantizing recipe reads fewer bytes, so its MBU is relative to the
unquantized weights.

If ``TORCHINDUCTOR_CACHE_DIR`` is unset, the bench points it at a fresh private temporary
folder, so compile times are cold compiles and no other process's cache is read or written.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["BASELINES", "add_arguments", "format_table", "main", "measure_bandwidth",
           "run_bench", "weight_bytes"]

BASELINES = ("eager", "inductor")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_PROMPT_TEXT = (
    "The history of computing is a story of abstractions built one on top of another. "
    "Early machines were programmed by rewiring panels; then came stored programs, "
    "assemblers, compilers and operating systems. Each layer hid the details of the one "
    "below it, so that people could think about larger problems. Today a language model "
    "runs on a stack of such layers: kernels, tensor libraries, graph compilers and "
    "serving systems. Explain, step by step, why memory bandwidth limits how fast a "
    "language model can generate text on a single machine, and what can be done about it. "
)


# --------------------------------------------------------------------------- helpers

def _ensure_cache_dir() -> str:
    """Point Inductor at a fresh private cache folder unless the user chose one."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmcompile-bench-")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each storage counted once (tied weights once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += p.numel() * p.element_size()
    return total


def measure_bandwidth(mb: int = 256, repeats: int = 5,
                      device: torch.device | str = "cpu") -> dict[str, Any]:
    """Memory bandwidth in GB/s (1e9 bytes/s), medians over ``repeats``.

    ``read_GBps``: ``x.sum()`` over a float32 tensor of ``mb`` MiB, counting its bytes once.
    ``copy_GBps``: ``y.copy_(x)``, counting the bytes read plus the bytes written.
    Both tensors are written once first, so no timed run pays for first-touch page faults.
    """
    device = torch.device(device)
    nbytes = int(mb) * 2**20
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    y = torch.zeros_like(x)
    reads, copies = [], []
    with torch.inference_mode():
        x.sum()
        y.copy_(x)
        _sync(device)
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            x.sum()
            _sync(device)
            reads.append(time.perf_counter() - t)
            t = time.perf_counter()
            y.copy_(x)
            _sync(device)
            copies.append(time.perf_counter() - t)
    del x, y
    read_s, copy_s = statistics.median(reads), statistics.median(copies)
    return {"method": f"float32 tensor of {mb} MiB: median of {max(1, repeats)} x.sum() "
                      "(bytes read) and y.copy_(x) (bytes read + written)",
            "bytes": nbytes, "repeats": max(1, repeats),
            "read_GBps": nbytes / read_s / 1e9, "copy_GBps": 2 * nbytes / copy_s / 1e9}


def _load(model: str, dtype: torch.dtype, prompt_len: int, seed: int
          ) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    """(model, prompt ids [1, P], tokenizer or None)."""
    from .models import ARCHITECTURES, load_smollm2, tiny_model

    if model == "smollm2":
        net, tokenizer = load_smollm2(dtype)
        text = _PROMPT_TEXT
        ids = tokenizer(text, return_tensors="pt").input_ids
        while ids.shape[1] < prompt_len:
            text += _PROMPT_TEXT
            ids = tokenizer(text, return_tensors="pt").input_ids
        return net, ids[:, :prompt_len].contiguous(), tokenizer
    if model in ARCHITECTURES:
        net = tiny_model(model, seed=seed).to(dtype)
        vocab = net.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (1, prompt_len), generator=gen)
        return net, ids, None
    raise ValueError(f"unknown model {model!r}; use smollm2 or a tiny architecture: "
                     f"{', '.join(sorted(ARCHITECTURES))}")


def _new_cache(net: torch.nn.Module, max_len: int, dtype: torch.dtype, device: torch.device):
    """A StaticCache, allocated up front so its buffers are marked as static addresses."""
    from transformers import StaticCache

    config = net.config.get_text_config(decoder=True)
    cache = StaticCache(config=net.config, max_cache_len=max_len)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if kv_heads and head_dim:
        try:
            cache.early_initialization(1, kv_heads, head_dim, dtype, device)
        except Exception:  # noqa: BLE001 - lazy initialization on the first forward still works
            cache = StaticCache(config=net.config, max_cache_len=max_len)
    return cache


class _Runner:
    """Greedy generation with a static cache through ``forward`` (eager or compiled)."""

    def __init__(self, forward: Callable, net: torch.nn.Module, prompt: torch.Tensor,
                 new_tokens: int, dtype: torch.dtype):
        import inspect

        self.forward = forward
        self.device = prompt.device
        self.prompt = prompt
        self.new_tokens = new_tokens
        p = prompt.shape[1]
        self.cache = _new_cache(net, p + new_tokens, dtype, self.device)
        self.prefill_pos = torch.arange(p, device=self.device)
        self.decode_pos = [torch.tensor([p + i], device=self.device)
                           for i in range(new_tokens - 1)]
        self.extra: dict[str, Any] = {"use_cache": True}
        if "logits_to_keep" in inspect.signature(net.forward).parameters:
            self.extra["logits_to_keep"] = 1

    def run(self) -> tuple[float, list[float], list[int]]:
        """(prefill seconds, per-step decode seconds, generated token ids)."""
        fwd, cache, sync, dev = self.forward, self.cache, _sync, self.device
        cache.reset()
        sync(dev)
        t = time.perf_counter()
        out = fwd(input_ids=self.prompt, past_key_values=cache, cache_position=self.prefill_pos,
                  **self.extra)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        prefill = time.perf_counter() - t
        tokens = [tok]
        steps = []
        for pos in self.decode_pos:
            t = time.perf_counter()
            out = fwd(input_ids=tok, past_key_values=cache, cache_position=pos, **self.extra)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(dev)
            steps.append(time.perf_counter() - t)
            tokens.append(tok)
        return prefill, steps, torch.cat(tokens, dim=1)[0].tolist()


def _graph_count() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


class _LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:300])


def _compile(name: str, kind: str, net: torch.nn.Module, fallback: bool) -> Callable:
    if kind == "baseline" and name == "eager":
        return net.forward
    torch._dynamo.reset()
    if kind == "baseline":
        return torch.compile(net.forward, backend="inductor", dynamic=False)
    return torch.compile(net.forward, backend="llmcompile", dynamic=False,
                         options={"recipe": name, "fallback": fallback})


# --------------------------------------------------------------------------- the bench

def run_bench(model: str = "smollm2", *, prompt_len: int = 128, new_tokens: int = 32,
              repeats: int = 5, warmup: int = 2, dtype: str = "float32",
              baselines: Sequence[str] = BASELINES, recipes: Sequence[str] = ("default",),
              threads: int | None = None, bandwidth_mb: int = 256, bandwidth_repeats: int = 5,
              fallback: bool = True, progress: bool = True, seed: int = 0,
              json_path: str | Path | None = None) -> dict[str, Any]:
    """Benchmark eager, plain Inductor and llmcompile recipes on one model; returns a dict.

    ``model`` is ``"smollm2"`` or a tiny architecture name (see :mod:`llmcompile.models`);
    ``recipes`` are preset names or .toml paths given to ``backend="llmcompile"``. The result
    (also written to ``json_path`` if given) holds the run's settings, ``memory_bandwidth``,
    ``weight_bytes`` and one entry per configuration in ``results``, with ``prefill_ms``,
    ``decode_ms_per_token``, ``decode_tokens_per_s``, ``compile_s``, ``mbu``, ``tokens`` and
    ``tokens_match`` (greedy tokens equal eager's), ``recompiles_during_timing`` and ``error``
    (None, or why the configuration could not run: the bench goes on with the others).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if prompt_len < 1 or new_tokens < 2:
        raise ValueError("need prompt_len >= 1 and new_tokens >= 2")
    if repeats < 1 or warmup < 2:
        raise ValueError("need repeats >= 1 and warmup >= 2")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    if recipes:
        from .recipe import resolve_recipe

        for r in recipes:  # a mistake in a recipe fails now, not after minutes of benchmarking
            resolve_recipe(r)

    cache_dir = _ensure_cache_dir()
    torch_dtype = DTYPES[dtype]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        return _run(model, prompt_len, new_tokens, repeats, warmup, dtype, torch_dtype,
                    list(dict.fromkeys(baselines)), list(dict.fromkeys(recipes)),
                    bandwidth_mb, bandwidth_repeats, fallback, progress, seed, json_path,
                    cache_dir)
    finally:
        torch.set_num_threads(old_threads)


def _run(model, prompt_len, new_tokens, repeats, warmup, dtype, torch_dtype, baselines,
         recipes, bandwidth_mb, bandwidth_repeats, fallback, progress, seed, json_path,
         cache_dir) -> dict[str, Any]:
    import transformers
    from tqdm.auto import tqdm

    bandwidth = measure_bandwidth(bandwidth_mb, bandwidth_repeats)
    base, prompt, tokenizer = _load(model, torch_dtype, prompt_len, seed)
    wbytes = weight_bytes(base)
    configs = [(b, "baseline") for b in baselines if b == "eager"]
    configs += [(b, "baseline") for b in baselines if b != "eager"]
    configs += [(r, "recipe") for r in recipes]

    result: dict[str, Any] = {
        "model": model, "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "decode_steps": new_tokens - 1, "repeats": repeats, "warmup": warmup,
        "threads": torch.get_num_threads(), "device": "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "inductor_cache_dir": cache_dir,
        "parameters": sum(p.numel() for p in base.parameters()),
        "weight_bytes": wbytes, "memory_bandwidth": bandwidth,
        "mbu_definition": "weight_bytes * decode_tokens_per_s / (read_GBps * 1e9)",
        "results": [],
    }

    reference: list[int] | None = None
    bar = tqdm(total=len(configs) * (warmup + repeats), unit="run", disable=not progress,
               file=sys.stderr, leave=False)
    try:
        with torch.inference_mode():
            if "eager" not in baselines:  # reference greedy tokens, untimed
                reference = _Runner(base.forward, base, prompt, new_tokens, torch_dtype).run()[2]
            for name, kind in configs:
                bar.set_description(name)
                entry = _bench_one(name, kind, base, prompt, new_tokens, torch_dtype, warmup,
                                   repeats, fallback, bar)
                if name == "eager" and kind == "baseline" and entry["error"] is None:
                    reference = entry["tokens"]
                entry["tokens_match"] = (entry["tokens"] == reference
                                         if entry["tokens"] is not None else None)
                tps = entry["decode_tokens_per_s"]
                entry["mbu"] = (wbytes * tps / (bandwidth["read_GBps"] * 1e9)
                                if tps else None)
                result["results"].append(entry)
    finally:
        bar.close()
        torch._dynamo.reset()

    eager = next((r for r in result["results"] if r["name"] == "eager" and r["error"] is None),
                 None)
    for r in result["results"]:
        ok = eager is not None and r["error"] is None
        r["prefill_speedup"] = eager["prefill_ms"] / r["prefill_ms"] if ok else None
        r["decode_speedup"] = (r["decode_tokens_per_s"] / eager["decode_tokens_per_s"]
                               if ok else None)
    if tokenizer is not None and reference is not None:
        result["sample_text"] = tokenizer.decode(reference)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _bench_one(name, kind, base, prompt, new_tokens, torch_dtype, warmup, repeats, fallback,
               bar) -> dict[str, Any]:
    from .backend import collect_reports

    entry: dict[str, Any] = {
        "name": name, "kind": kind, "error": None, "compile_s": None,
        "warmup_overhead_s": None, "first_run_s": None,
        "prefill_ms": None, "prefill_tokens_per_s": None, "decode_ms_per_token": None,
        "decode_tokens_per_s": None, "prefill_ms_runs": [], "decode_ms_runs": [],
        "graphs_compiled": 0, "graph_breaks": 0, "recompiles_during_timing": 0,
        "tokens": None, "warnings": [],
    }
    is_eager = kind == "baseline" and name == "eager"
    net = base if is_eager else copy.deepcopy(base)
    capture = _LogCapture()
    loggers = [logging.getLogger("llmcompile"), logging.getLogger("torch._dynamo")]
    for lg in loggers:
        lg.addHandler(capture)
    done = 0
    try:
        with collect_reports() as reports:
            forward = _compile(name, kind, net, fallback)
            graphs0, breaks0 = _graph_count(), _graph_breaks()
            runner = _Runner(forward, net, prompt, new_tokens, torch_dtype)
            warm_times, tokens = [], None
            for i in range(warmup):
                t = time.perf_counter()
                _, _, toks = runner.run()
                warm_times.append(time.perf_counter() - t)
                bar.update(1)
                done += 1
                if i == 0:
                    tokens = toks
            graphs1 = _graph_count()
            prefills, steps, totals = [], [], []
            for _ in range(repeats):
                t = time.perf_counter()
                prefill, step_times, toks = runner.run()
                totals.append(time.perf_counter() - t)
                prefills.append(prefill)
                steps.extend(step_times)
                entry["decode_ms_runs"].append(1000 * sum(step_times) / len(step_times))
                bar.update(1)
                done += 1
                if toks != tokens:
                    entry["warnings"].append("greedy tokens changed between runs")
            graphs2 = _graph_count()
        p_med, s_med = statistics.median(prefills), statistics.median(steps)
        overhead = max(0.0, sum(warm_times) - warmup * statistics.median(totals))
        entry.update(
            compile_s=0.0 if is_eager else overhead, warmup_overhead_s=overhead,
            first_run_s=warm_times[0],
            prefill_ms=1000 * p_med, prefill_tokens_per_s=prompt.shape[1] / p_med,
            decode_ms_per_token=1000 * s_med, decode_tokens_per_s=1 / s_med,
            prefill_ms_runs=[1000 * p for p in prefills],
            graphs_compiled=graphs2 - graphs0, graph_breaks=_graph_breaks() - breaks0,
            recompiles_during_timing=graphs2 - graphs1, tokens=tokens,
        )
        if not is_eager and kind == "recipe":
            fired: dict[str, int] = {}
            for rep in reports:
                for rule, n in rep.counts().items():
                    if n:
                        fired[rule] = fired.get(rule, 0) + n
            entry["pipeline_graphs"] = len(reports)
            entry["rules_fired"] = fired
        if entry["recompiles_during_timing"]:
            msg = (f"llmcompile bench: {name}: {entry['recompiles_during_timing']} graph(s) "
                   "compiled during the timed runs; its timings include recompilation")
            entry["warnings"].append(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
    except Exception as e:  # noqa: BLE001 - one failing configuration must not end the bench
        entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        bar.update(warmup + repeats - done)
    finally:
        for lg in loggers:
            lg.removeHandler(capture)
        if not is_eager:
            del net
            torch._dynamo.reset()
        gc.collect()
    entry["warnings"].extend(m for m in dict.fromkeys(capture.messages))
    return entry


# --------------------------------------------------------------------------- output / CLI

def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The human-readable table of a :func:`run_bench` result."""
    bw = result["memory_bandwidth"]
    lines = [
        f"model {result['model']} ({result['parameters'] / 1e6:.1f} M params, "
        f"{result['weight_bytes'] / 2**20:.1f} MiB weights, {result['dtype']}), prompt "
        f"{result['prompt_len']}, {result['new_tokens']} new tokens, {result['repeats']} "
        f"repeats after {result['warmup']} warm-up runs, {result['threads']} threads",
        f"memory bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s "
        f"(MBU uses read)",
        "",
    ]
    header = (f"{'config':<16}{'compile s':>10}{'TTFT ms':>10}{'x eager':>8}"
              f"{'TPOT ms':>10}{'tok/s':>9}{'x eager':>8}{'MBU':>7}{'graphs':>7}"
              f"{'match':>7}")
    lines += [header, "-" * len(header)]
    for r in result["results"]:
        label = r["name"] if r["kind"] == "baseline" else f"llmc:{r['name']}"
        if r["error"]:
            lines.append(f"{label:<16}  error: {r['error']}")
            continue
        mbu = None if r["mbu"] is None else 100 * r["mbu"]
        match = {True: "yes", False: "NO", None: "-"}[r["tokens_match"]]
        lines.append(
            f"{label:<16}{_fmt(r['compile_s'], '.1f'):>10}{_fmt(r['prefill_ms'], '.2f'):>10}"
            f"{_fmt(r['prefill_speedup'], '.2f'):>8}{_fmt(r['decode_ms_per_token'], '.2f'):>10}"
            f"{_fmt(r['decode_tokens_per_s'], '.1f'):>9}{_fmt(r['decode_speedup'], '.2f'):>8}"
            f"{_fmt(mbu, '.1f') + '%':>7}{r['graphs_compiled']:>7}{match:>7}")
    notes = [f"  {r['name']}: {w}" for r in result["results"] for w in r["warnings"]]
    if notes:
        lines += ["", "warnings:"] + notes
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``llmcompile bench``."""
    from .models import ARCHITECTURES

    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (SmolLM2-135M-Instruct) or a tiny random architecture: "
                             + ", ".join(sorted(ARCHITECTURES)) + " (default: smollm2)")
    parser.add_argument("--prompt-len", type=int, default=128,
                        help="prompt tokens (default: 128)")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="generated tokens: 1 from the prefill, the rest one decode step "
                             "each (default: 32)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed runs per configuration (default: 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs before timing, at least 2 (default: 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--recipes", nargs="*", default=["default"], metavar="RECIPE",
                        help="llmcompile recipes (preset names or .toml files) to compare "
                             "(default: default)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES, default=list(BASELINES),
                        help="baselines to compare (default: eager inductor)")
    parser.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--bandwidth-mb", type=int, default=256,
                        help="size of the bandwidth probe tensor in MiB (default: 256)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="a graph llmcompile cannot handle is an error instead of plain "
                             "Inductor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``llmcompile bench``; 0 when every configuration ran, 1 otherwise."""
    result = run_bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
                       baselines=args.baselines, recipes=args.recipes, threads=args.threads,
                       bandwidth_mb=args.bandwidth_mb, fallback=not args.no_fallback,
                       progress=not args.no_progress, json_path=args.json)
    print(format_table(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0 if all(r["error"] is None for r in result["results"]) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="llmcompile bench", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
