"""Capture: a Dynamo graph or a ``torch.export`` program becomes one :class:`Program`.

A Program is the single IR every pass sees: one pre-dispatch ATen graph (``aten.linear``,
``aten.scaled_dot_product_attention``, ``aten.silu`` survive) whose nodes carry ``meta["val"]``
and ``meta["nn_module_stack"]``, plus which inputs are weights and their real values, so that
passes may rewrite weights once, at compile time.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from . import stages
from .canonicalize import VIEW_OPS

__all__ = ["CompiledGraph", "Collector", "Program", "add_seconds", "capture_dynamo",
           "capture_export", "capture_function", "collect_compiled", "publish_compiled",
           "source_name", "tensor_key"]


@contextlib.contextmanager
def add_seconds(seconds: dict[str, float], stage: str):
    """Add the wall time of the block to ``seconds[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def tensor_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors that are one tensor: the same memory, shape, strides and dtype
    (a tied embedding and LM head registered as two weights)."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


@dataclass
class CompiledGraph:
    """A graph a backend compiled: Dynamo's graph, the real inputs of the call that compiled
    it (placeholder order) and the callable Dynamo calls with such inputs."""

    gm: fx.GraphModule
    example_inputs: list
    compiled: Callable


_compiled_sink: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "llmc_compiled", default=None)


class Collector:
    """Context manager collecting, into the list it returns, what is published to a context
    variable inside it (the innermost collector gets it)."""

    def __init__(self, var: contextvars.ContextVar):
        self._var = var

    def __enter__(self) -> list:
        self.items: list = []
        self._token = self._var.set(self.items)
        return self.items

    def __exit__(self, *exc) -> None:
        self._var.reset(self._token)


class collect_compiled(Collector):
    """Collects a :class:`CompiledGraph` for every graph compiled inside it
    (:mod:`llmcompile.deploy.direct` calls a decode step's graph without Dynamo so)."""

    def __init__(self):
        super().__init__(_compiled_sink)


def publish_compiled(gm: fx.GraphModule, example_inputs: Sequence[Any],
                     compiled: Callable) -> None:
    """Hand a compiled graph to the innermost :class:`collect_compiled`, if any."""
    sink = _compiled_sink.get()
    if sink is not None:
        sink.append(CompiledGraph(gm, list(example_inputs), compiled))


@dataclass
class Program:
    """One ATen-level graph plus what the passes need to know about its inputs."""

    gm: fx.GraphModule
    #: placeholder (or get_attr) node name -> real tensor, for inputs that are model weights
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    #: node name -> module path of the weight ("model.layers.0.mlp.up_proj.weight")
    sources: dict[str, str] = field(default_factory=dict)
    fake_mode: Any = None
    #: what passes may need beyond the graph (e.g. ``tokenizer`` for calibration)
    context: dict[str, Any] = field(default_factory=dict)
    #: stripped from module paths (a wrapper module's attribute name, e.g. ``"model."``)
    path_prefix: str = ""
    #: the expressions Dynamo reached the model through (``L['self']``, ``L['args'][0]``...),
    #: found from the weights' sources; module paths are relative to them
    roots: tuple[str, ...] = ()
    _const_ids: itertools.count = field(default_factory=itertools.count, repr=False)
    #: traced replacements, reused for matches with the same rule, input shapes and constants
    #: (every layer of a model): see ``core.rewrite``
    replacements: dict = field(default_factory=dict, repr=False)
    #: wall seconds of stages that passes time themselves (``calibration``), summed
    seconds: dict[str, float] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def timed(self, stage: str):
        """Add the wall time of the block to ``seconds[stage]`` (and the process's table)."""
        with stages.stage(stage), add_seconds(self.seconds, stage):
            yield

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
        A tensor already registered (the same object: packed weights two rules share, a tied
        LM head and embedding) is read from its one buffer, so it is stored once.
        """
        name = next((n for n, b in self.gm.named_buffers() if b is tensor), None)
        if name is None:
            name = f"_llmc_{hint}_{next(self._const_ids)}"
            while hasattr(self.gm, name):
                name = f"_llmc_{hint}_{next(self._const_ids)}"
            # persistent: a set of non-persistent names pickles in a random order, which
            # changes torch's compile-cache keys from one process to the next
            self.gm.register_buffer(name, tensor)
            _compat.hash_by_metadata(tensor)
        node = self.graph.get_attr(name)
        node.meta["val"] = _fake_constant(self.fake_mode, tensor)
        return node

    def module_path(self, node: fx.Node) -> str:
        """Dotted path of the innermost module a node was traced in ('' at top level)."""
        stack = node.meta.get("nn_module_stack") or {}
        if not stack:
            return ""
        path = module_path(list(stack.values())[-1][0], self.roots)
        return path.removeprefix(self.path_prefix) if self.path_prefix else path

    def recompile(self) -> None:
        self.graph.lint()
        self.gm.recompile()


def _fake_constant(fake_mode, tensor: torch.Tensor):
    if fake_mode is None:
        return tensor
    with fake_mode:
        return fake_mode.from_tensor(tensor, static_shapes=True)


# How Dynamo names the object it reached the model through: ``L['self']`` (a bound method),
# ``L['args'][0]`` (a forward wrapped by a decorator taking ``*args``), ``G['model']`` (a
# global)... Weights are always read through the module tree's own dicts.
_TREE = ("._modules[", "._parameters[", "._buffers[")
_ROOT_EXPR = re.compile(r"^(?:[LG]\[[^\]]*\](?:\[[^\]]*\])*|self)(?=\.|$)")


def source_root(source_name: str) -> str | None:
    """``L['args'][0]`` for ``L['args'][0]._modules['lm_head']._parameters['weight']``: the
    expression before the first step into a module's own dicts (None if there is none)."""
    cuts = [i for i in (source_name.find(t) for t in _TREE) if i > 0]
    return source_name[: min(cuts)] if cuts else None


def module_path(path: str, roots: Sequence[str] = ()) -> str:
    """A Dynamo / export module path relative to the model: ``L['args'][0].model.layers[0]``
    -> ``model.layers.0``, whatever the root expression (``roots`` first, longest first)."""
    for root in sorted(roots, key=len, reverse=True):
        if path == root or path.startswith(root + ".") or path.startswith(root + "["):
            path = path[len(root):]
            break
    else:
        path = _ROOT_EXPR.sub("", path, count=1)
    for container in ("._modules", "._parameters", "._buffers"):
        path = path.replace(container, "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


def source_name(placeholder: fx.Node) -> str | None:
    """Dynamo's source of a placeholder (``L['kwargs']['input_ids']``), where it has one."""
    grapharg = placeholder.meta.get("grapharg")
    if grapharg is None:
        return None
    source = grapharg.source
    return source.name() if callable(source.name) else source.name


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
    program = Program(traced, fake_mode=fake_mode)
    new_placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    mutated = mutated_inputs(traced.graph)
    names = [source_name(old) for old in placeholders]
    program.roots = tuple(sorted({r for r in map(source_root, filter(None, names)) if r}))
    for name, new, real in zip(names, new_placeholders, example_inputs):
        source = module_path(name, program.roots) if name else new.name
        new.meta["llmc_source"] = source
        is_param = isinstance(real, torch.nn.Parameter)
        is_buffer = getattr(real, "_dynamo_static_input_type", None) is not None
        if (is_param or is_buffer) and new not in mutated:
            program.weights[new.name] = real.detach()
            program.sources[new.name] = source
    return program


def capture_export(ep: torch.export.ExportedProgram, root: str = "") -> Program:
    """Turn a ``torch.export`` program (pre-dispatch, not decomposed) into a Program.

    ``root`` is the model's attribute path inside the exported module (``"model."`` for a
    wrapper holding it as ``self.model``): paths are read relative to the model itself.
    """
    gm = ep.graph_module
    sig = ep.graph_signature
    fake_vals = [n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]
    program = Program(gm, fake_mode=_compat.detect_fake_mode(fake_vals), path_prefix=root)
    mutated = {n.name for n in mutated_inputs(gm.graph)}
    named = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    tensors = {**ep.state_dict, **ep.constants}
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node.name in named and node.name not in mutated:
            fqn = named[node.name]
            program.weights[node.name] = tensors[fqn].detach()
            program.sources[node.name] = fqn.removeprefix(root)
    return program


def capture_function(fn, args: Sequence[Any], weights: Sequence[int] = (),
                     static: bool = False) -> Program:
    """Trace a plain function on example ``args`` into a Program (tests, patterns).

    ``weights`` lists the indices of ``args`` to treat as model weights. Shapes are symbolic
    (as after Dynamo's dynamic recompile) unless ``static`` (as in a decode step's graph).
    """
    fake_mode = _compat.static_fake_mode() if static else _compat.fake_mode_for([])
    with fake_mode:
        fake_args = [fake_mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
    gm = _compat.trace_aten(fn, fake_args, fake_mode)
    program = Program(gm, fake_mode=fake_mode)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i in weights:
        program.weights[placeholders[i].name] = args[i]
        program.sources[placeholders[i].name] = placeholders[i].name
    return program
