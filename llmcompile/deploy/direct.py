"""A compiled decode step called without Dynamo.

Every call of a ``torch.compile``d function first runs Dynamo's guards and the bytecode around
its graph: for a transformers model, argument handling, the output dataclass and the cache
object's bookkeeping. For SmolLM2's one-token step on this project's 2-thread CPU that was
2.5-3 ms of a 10-16 ms step (BENCHMARKS.md). A static decode step's graph takes the same
tensors on every call except the token ids and their positions: the weights are the model's,
and the static KV cache is written in place. :class:`DirectGraph` keeps the flat inputs Dynamo
passed when it compiled the graph, puts the new ids and positions in their slots and calls the
compiled graph itself.

Used only where that is known to be safe, which :func:`build` checks:

* one graph was compiled for the call (no graph break);
* every other input is a tensor of the model (parameter, buffer or tensor attribute of a
  module) or of the cache (re-bound by layer and attribute when the cache is replaced by one
  of the same shapes);
* one output is the logits (``[1, n, vocab]``);
* and, checked by the caller on a later Dynamo call (:func:`python_state`), the call changes
  no Python state of the cache outside the graph (a sliding-window ``StaticCache`` layer
  counts in a Python int, for instance: Dynamo then stays in the loop).

``LLMCOMPILE_DIRECT_STEP=0`` keeps every step on Dynamo (for comparisons).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from ..core.program import CompiledGraph, source_name

log = logging.getLogger("llmcompile")

__all__ = ["DirectGraph", "build", "enabled", "python_state"]


def enabled() -> bool:
    return os.environ.get("LLMCOMPILE_DIRECT_STEP", "1") != "0"


class Unsupported(Exception):
    """Why a graph is not called directly."""


def _cache_objects(cache: Any) -> list:
    return [] if cache is None else [cache, *getattr(cache, "layers", ())]


def _cache_tensors(cache: Any) -> Iterator[tuple[tuple[int, str], torch.Tensor]]:
    for i, obj in enumerate(_cache_objects(cache)):
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                yield (i, name), value


def _model_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)
        yield from (v for v in vars(module).values() if isinstance(v, torch.Tensor))


def python_state(cache: Any) -> list:
    """The cache's non-tensor attributes (the cache object and each layer), to compare before
    and after a call: anything a call changes here happens outside the graph."""
    state = []
    for i, obj in enumerate(_cache_objects(cache)):
        for name, value in vars(obj).items():
            if isinstance(value, torch.Tensor):
                continue
            plain = value is None or isinstance(value, (bool, int, float, str))
            state.append((i, name, value if plain else id(value)))
    return state


class DirectGraph:
    """Calls one compiled static graph with new ``input_ids`` and ``cache_position``."""

    def __init__(self, graph: CompiledGraph, model: torch.nn.Module, cache: Any):
        placeholders = [n for n in graph.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(graph.example_inputs):
            raise Unsupported("placeholders and inputs differ in number")
        fixed = {id(t) for t in _model_tensors(model)}
        in_cache = {id(t): path for path, t in _cache_tensors(cache)}
        self.compiled = graph.compiled
        self.args = list(graph.example_inputs)
        self.cache_slots: dict[int, tuple[int, str]] = {}
        self.shapes: dict[int, tuple] = {}
        self.ids_at = self.pos_at = -1
        for i, (node, value) in enumerate(zip(placeholders, self.args)):
            source = source_name(node) or node.name  # either spelling
            if not isinstance(value, torch.Tensor):
                raise Unsupported(f"input {source} is not a tensor ({type(value).__name__})")
            key = re.sub(r"[^a-z0-9]+", "_", source.lower()).strip("_")
            if key.endswith("kwargs_input_ids"):
                self.ids_at = i
            elif key.endswith("kwargs_cache_position"):
                self.pos_at = i
            elif id(value) in in_cache:
                self.cache_slots[i] = in_cache[id(value)]
                self.shapes[i] = (tuple(value.shape), value.dtype)
            elif id(value) not in fixed:
                raise Unsupported(f"input {source} is neither the model's nor the cache's")
        if self.ids_at < 0:
            raise Unsupported("the graph takes no input_ids tensor")
        self.logits_at = _logits_output(graph.gm, model)

    def bind(self, cache: Any) -> bool:
        """Point the cache slots at ``cache``'s tensors; False where its shapes differ (the
        graph then no longer applies)."""
        found = dict(_cache_tensors(cache))
        for i, path in self.cache_slots.items():
            t = found.get(path)
            if t is None or (tuple(t.shape), t.dtype) != self.shapes[i]:
                return False
            self.args[i] = t
        return True

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [n, vocab] of ``ids`` [1, n] at ``positions`` [n]."""
        args = self.args
        args[self.ids_at] = ids
        if self.pos_at >= 0:  # graphs that place by the cache's own counters take none
            args[self.pos_at] = positions
        return self.compiled(*args)[self.logits_at][0]


def _logits_output(gm: fx.GraphModule, model: torch.nn.Module) -> int:
    config = model.config.get_text_config() if hasattr(model, "config") else None
    vocab = getattr(config, "vocab_size", None)
    outputs = next(n for n in reversed(gm.graph.nodes) if n.op == "output").args[0]
    outputs = outputs if isinstance(outputs, (list, tuple)) else (outputs,)
    found = [i for i, n in enumerate(outputs) if isinstance(n, fx.Node)
             and isinstance(v := n.meta.get("example_value"), torch.Tensor)
             and v.dim() == 3 and v.shape[0] == 1 and v.shape[-1] == vocab]
    if len(found) != 1:
        raise Unsupported(f"{len(found)} outputs look like the logits")
    return found[0]


def build(graphs: list[CompiledGraph], model: torch.nn.Module, cache: Any
          ) -> DirectGraph | None:
    """The direct call of the graph compiled for a step, or None (logged at debug level)."""
    try:
        if len(graphs) != 1:
            raise Unsupported(f"{len(graphs)} graphs were compiled for one step")
        return DirectGraph(graphs[0], model, cache)
    except Unsupported as e:
        log.debug("llmcompile: decode steps stay on Dynamo: %s", e)
        return None
