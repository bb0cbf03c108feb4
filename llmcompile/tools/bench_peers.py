"""``llmcompile bench``: the configurations compared side by side (eager, plain Inductor,
torchao's weight-only peers, llmcompile recipes), how each is compiled, and what is captured
while it is (graphs, graph breaks, warnings)."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from .bench_runner import Runner


def graph_count() -> int:
    return _compat.dynamo_counters()[0]


def graph_breaks() -> int:
    return _compat.dynamo_counters()[1]


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage().splitlines()[0][:300])


def compile_config(name: str, kind: str, net: torch.nn.Module, fallback: bool) -> Callable:
    if kind == "baseline" and name == "eager":
        return net.forward
    if kind == "baseline":
        return torch.compile(net.forward, backend="inductor", dynamic=False)
    options = {"recipe": name, "fallback": fallback}
    tokenizer = _compat.tokenizer_path(net)
    if tokenizer:  # calibrated recipes tokenize their calibration text with it
        options["tokenizer"] = tokenizer
    return torch.compile(net.forward, backend="llmcompile", dynamic=False, options=options)


class Config:
    """One configuration: its model copy, runner, and what was measured."""

    def __init__(self, name: str, kind: str):
        self.name, self.kind = name, kind
        self.is_eager = kind == "baseline" and name == "eager"
        self.runner: Runner | None = None
        self.net: torch.nn.Module | None = None
        self.warm_times: list[float] = []
        #: cost-model costs of the compiled graphs, prefill first, decode last
        self.costs: list = []
        self.tokens: list[int] | None = None
        self.prefills: list[float] = []
        self.step_medians: list[float] = []
        self.totals: list[float] = []
        self.entry: dict[str, Any] = {
            "name": name, "kind": kind, "error": None, "compile_s": None,
            "warmup_overhead_s": None, "first_run_s": None, "weight_bytes": None,
            "weight_bytes_source": None,
            "prefill_ms": None, "prefill_tokens_per_s": None, "decode_ms_per_token": None,
            "decode_tokens_per_s": None, "prefill_ms_runs": [], "decode_ms_runs": [],
            "graphs_compiled": 0, "graph_breaks": 0, "recompiles_during_timing": 0,
            "tokens": None, "warnings": [], "predicted_prefill_ms": None,
            "predicted_decode_ms": None, "predicted_tokens_per_s": None, "prediction": None,
        }

    def fail(self, e: BaseException) -> None:
        self.entry["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        self.runner = self.net = None


class Capture:
    """Attach a warning-capturing handler to the llmcompile and Dynamo loggers."""

    def __init__(self, entry: dict[str, Any]):
        self.entry = entry
        self.handler = LogCapture()
        self.loggers = [logging.getLogger("llmcompile"), logging.getLogger("torch._dynamo")]

    def __enter__(self) -> None:
        for lg in self.loggers:
            lg.addHandler(self.handler)

    def __exit__(self, *exc) -> None:
        for lg in self.loggers:
            lg.removeHandler(self.handler)
        known = set(self.entry["warnings"])
        self.entry["warnings"].extend(m for m in dict.fromkeys(self.handler.messages)
                                      if m not in known)


def graph_costs(net: torch.nn.Module, prompt: torch.Tensor, new_tokens: int,
                dtype: torch.dtype) -> list:
    """Cost-model costs of the graphs plain Inductor compiles for ``net`` (prefill, decode):
    captured by a recording backend, canonicalized, no passes, not compiled."""
    from ..core.recipe import Recipe
    from .explain import recorder

    reports: list = []
    forward = torch.compile(copy.deepcopy(net).forward, dynamic=False,
                            backend=recorder(Recipe(name="plain inductor"), reports))
    Runner(forward, net, prompt, min(new_tokens, 2), dtype).run()
    return [r.cost.after for r in reports if r.cost is not None]


_NO_PREDICTION = {
    "eager": "eager runs op by op; its per-op dispatch overhead is not in the machine profile",
    "torchao-int8": "torchao's weights are tensor subclasses the cost model does not see",
    "torchao-int4": "torchao's weights are tensor subclasses the cost model does not see",
    "llama.cpp": "llama.cpp's kernels are not in the cost model",
}


def predictions(configs: list[Config], progress: bool) -> dict[str, Any]:
    """Predicted TTFT and TPOT of every configuration with costs (this machine's profile),
    with which term of the model a miss of more than 25% points to."""
    from ..analysis.roofline import predict
    from .machine import load_machine

    machine = load_machine(progress=print if progress else (lambda s: None))
    for c in configs:
        entry = c.entry
        if not c.costs or entry["error"]:
            entry["prediction"] = _NO_PREDICTION.get(c.name, "no cost report")
            continue
        prefill, decode = predict(c.costs[0], {}, machine), predict(c.costs[-1], {}, machine)
        entry["predicted_prefill_ms"] = prefill.seconds * 1e3
        entry["predicted_decode_ms"] = decode.seconds * 1e3
        entry["predicted_tokens_per_s"] = 1 / decode.seconds
        entry["prediction"] = _explain_miss(decode, entry["decode_ms_per_token"])
    return machine.to_dict()


def _explain_miss(p, measured_ms: float | None) -> str:
    """The terms of a decode prediction, and which one a miss points to."""
    terms = {"memory": p.memory_s * 1e3, "compute": p.compute_s * 1e3,
             "overhead": p.overhead_s * 1e3}
    text = (f"memory {terms['memory']:.2f} ms + compute {terms['compute']:.2f} ms + overhead "
            f"{terms['overhead']:.2f} ms ({p.launches} kernels)")
    if not measured_ms:
        return text
    error = p.seconds * 1e3 / measured_ms - 1
    text += f"; predicted {error:+.0%} vs measured"
    if abs(error) > 0.25:
        gap = measured_ms - p.seconds * 1e3
        term = max(("memory", "overhead"), key=terms.get)
        text += (f"; MISS: the {term} term would have to be "
                 f"{(terms[term] + gap) / terms[term]:.2f}x what the profile says")
    return text
