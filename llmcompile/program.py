"""Capture: a Dynamo graph or a ``torch.export`` program becomes one :class:`Program`.

A Program is the single IR every pass sees: one pre-dispatch ATen graph (``aten.linear``,
``aten.scaled_dot_product_attention``, ``aten.silu`` survive) whose nodes carry ``meta["val"]``
and ``meta["nn_module_stack"]``, plus which inputs are weights and their real values, so that
passes may rewrite weights once, at compile time.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from . import _compat
from .canonicalize import VIEW_OPS

__all__ = ["Program", "capture_dynamo", "capture_export", "capture_function"]


@dataclass
class Program:
    """One ATen-level graph plus what the passes need to know about its inputs."""

    gm: fx.GraphModule
    #: placeholder (or get_attr) node name -> real tensor, for inputs that are model weights
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: node name -> module path of the weight ("model.layers.0.mlp.up_proj.weight")
    sources: dict[str, str] = field(default_factory=dict)
    fake_mode: Any = None
    #: the real inputs of the call being compiled (calibration reruns the graph on them)
    example_inputs: list | None = None
    #: what passes may need beyond the graph (e.g. ``tokenizer`` for calibration)
    context: dict[str, Any] = field(default_factory=dict)
    #: stripped from module paths (a wrapper module's attribute name, e.g. ``"model."``)
    path_prefix: str = ""
    _const_ids: itertools.count = field(default_factory=itertools.count, repr=False)

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def is_weight(self, node: Any) -> bool:
        """True for a weight input or a compile-time constant (folded / packed weight)."""
        return isinstance(node, fx.Node) and (
            node.name in self.weights or node.op == "get_attr"
        )

    def weight(self, node: fx.Node) -> torch.Tensor | None:
        """The real tensor behind a weight node, or None when the node is not a weight."""
        if node.op == "get_attr":
            return getattr(self.gm, node.target)
        return self.weights.get(node.name)

    def add_constant(self, tensor: torch.Tensor, hint: str = "const") -> fx.Node:
        """Register ``tensor`` on the graph module and return a ``get_attr`` node reading it.

        The caller positions the node (``graph.inserting_before``); ``meta["val"]`` is set.
        """
        name = f"_llmc_{hint}_{next(self._const_ids)}"
        while hasattr(self.gm, name):
            name = f"_llmc_{hint}_{next(self._const_ids)}"
        self.gm.register_buffer(name, tensor, persistent=False)
        node = self.graph.get_attr(name)
        node.meta["val"] = _fake_constant(self.fake_mode, tensor)
        return node

    def module_path(self, node: fx.Node) -> str:
        """Dotted path of the innermost module a node was traced in ('' at top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = _clean_module_path(list(stack.values())[-1][0])
        return path.removeprefix(self.path_prefix) if self.path_prefix else path

    def recompile(self) -> None:
        self.graph.lint()
        self.gm.recompile()


def _fake_constant(fake_mode, tensor: torch.Tensor):
    if fake_mode is None:
        return tensor
    with fake_mode:
        return fake_mode.from_tensor(tensor, static_shapes=True)


def _clean_module_path(path: str) -> str:
    """``L['self'].model.layers[0].mlp`` -> ``model.layers.0.mlp``."""
    for prefix in ("L['self'].", "L['self']", "self."):
        if path.startswith(prefix):
            path = path[len(prefix) :]
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def _weight_source(placeholder: fx.Node) -> str:
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None:
        return placeholder.name
    name = grapharg.source.name() if callable(grapharg.source.name) else grapharg.source.name
    return _clean_module_path(name.replace("._modules", "").replace("._parameters", "")
                              .replace("._buffers", ""))


def mutated_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Placeholders written in place, directly or through a chain of views."""
    alias_of: dict[fx.Node, fx.Node] = {}
    written: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder":
            alias_of[node] = node
            continue
        if node.op != "call_function" or not node.args:
            continue
        base = alias_of.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
        if base is not None and getattr(node.target, "overloadpacket", None) in VIEW_OPS:
            alias_of[node] = base
        schema = getattr(node.target, "_schema", None)
        if schema is None:
            continue
        for arg, value in zip(schema.arguments, node.args):
            if arg.alias_info is not None and arg.alias_info.is_write and value in alias_of:
                written.add(alias_of[value])
    return written


def capture_dynamo(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Program:
    """Turn the torch-level graph Dynamo hands a backend into a Program.

    The graph is re-traced through an ``fx.Interpreter`` with ``make_fx(pre_dispatch=True)``
    inside Dynamo's own fake mode, so symbolic sizes keep Dynamo's symbols (guards stay valid)
    and ``nn_module_stack`` survives. Placeholders keep Dynamo's order: weights map by index.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    fake_vals = [n.meta.get("example_value") for n in placeholders]
    if any(v is None for v in fake_vals):
        raise RuntimeError("Dynamo graph placeholders carry no example_value; cannot capture")
    fake_mode = _compat.fake_mode_for(fake_vals)

    def run(*args):
        return fx.Interpreter(gm).run(*args)

    traced = _compat.trace_aten(run, fake_vals, fake_mode)
    program = Program(traced, fake_mode=fake_mode, example_inputs=list(example_inputs))
    new_placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    mutated = mutated_inputs(traced.graph)
    for old, new, real in zip(placeholders, new_placeholders, example_inputs):
        new.meta["llmc_source"] = _weight_source(old)
        is_param = isinstance(real, torch.nn.Parameter)
        is_buffer = getattr(real, "_dynamo_static_input_type", None) is not None
        if (is_param or is_buffer) and new not in mutated:
            program.weights[new.name] = real.detach()
            program.sources[new.name] = _weight_source(old)
    return program


def capture_export(ep: torch.export.ExportedProgram) -> Program:
    """Turn a ``torch.export`` program (pre-dispatch, not decomposed) into a Program."""
    gm = ep.graph_module
    sig = ep.graph_signature
    fake_vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    program = Program(gm, fake_mode=_compat.detect_fake_mode(fake_vals))
    mutated = {n.name for n in mutated_inputs(gm.graph)}
    named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    tensors = {**ep.state_dict, **ep.constants}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in named and node.name not in mutated:
            fqn = named[node.name]
            program.weights[node.name] = tensors[fqn].detach()
            program.sources[node.name] = fqn
    return program


def capture_function(fn, args: Sequence[Any], weights: Sequence[int] = ()) -> Program:
    """Trace a plain function on example ``args`` into a Program (tests, patterns).

    ``weights`` lists the indices of ``args`` to treat as model weights.
    """
    fake_mode = _compat.fake_mode_for([])
    with fake_mode:
        fake_args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    gm = _compat.trace_aten(fn, fake_args, fake_mode)
    program = Program(gm, fake_mode=fake_mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in weights:
        program.weights[placeholders[i].name] = args[i]
        program.sources[placeholders[i].name] = placeholders[i].name
    return program
