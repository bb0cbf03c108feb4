"""``llmcompile bench``: the configurations compared side by side (eager, plain Inductor,
torchao's weight-only peers, llmcompile recipes), how each is compiled, and what is captured
while it is (graphs, graph breaks, warnings)."""

from __future__ import annotations

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
            "tokens": None, "warnings": [],
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
