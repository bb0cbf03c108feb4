"""Lowering to ONNX and ONNX Runtime.

The rewritten Program becomes an ONNX model in two steps:

1. *lowering rules* (``lower/onnx_attention.py``): causal attention over a KV cache becomes
   ``llmcompile.group_query_attention``, which ONNX Runtime runs as ``GroupQueryAttention``;
   symbolic-size inputs become ``sym_size``;
2. *direct emission* (:mod:`.onnx_emit`): every node translated once, with torch.onnx's own
   translations plus those of :mod:`llmcompile.ops.onnx` (contrib ops where the provider runs
   them, standard ONNX ops otherwise); weights become initializers (a tensor shared by two
   weights, a tied embedding and LM head, is stored once), saved as external data.

A graph that direct emission does not take (an op without a translation, an in-place write)
goes the *traced* way instead, with a logged reason: weights become constants, ``torch.export``
with every symbolic dimension dynamic, then ``torch.onnx.export``, which decomposes first.
Both give the same file where both apply; the traced way takes several times longer.

:func:`compile_onnxruntime` wraps the file in an ``InferenceSession`` that takes and returns
torch tensors through IO binding on their own memory (CUDA provider when the model is on a
GPU and ``onnxruntime-gpu`` is installed; the CPU provider otherwise, with one logged warning).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx

from .. import _compat
from ..core.program import Program, tensor_key
from ..core.rewrite import Stats, apply_rules
from ..ops.onnx import CPU, CUDA, translation_table
from . import onnx_emit

log = logging.getLogger("llmcompile")

__all__ = ["OnnxLoweringError", "OrtRunner", "compile_onnxruntime", "model_dtype",
           "pick_provider", "prepare", "to_onnx"]

OPSET = 23
_SESSIONS: collections.OrderedDict = collections.OrderedDict()  # (graph, recipe) -> runner
_MAX_SESSIONS = 16
_warned: set[str] = set()


class OnnxLoweringError(RuntimeError):
    """A graph that cannot be exported to ONNX or run by ONNX Runtime (names the op/node)."""


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning("llmcompile: %s", message)


def pick_provider(device: torch.device) -> str:
    """The ONNX Runtime execution provider for tensors on ``device``."""
    import onnxruntime as ort

    if CUDA in ort.get_available_providers() and (device.type == "cuda"
                                                 or torch.cuda.is_available()):
        return CUDA if device.type == "cuda" else CPU
    why = ("this ONNX Runtime build has no CUDAExecutionProvider (install onnxruntime-gpu "
           "instead of onnxruntime for GPUs)")
    _warn_once(f"ONNX Runtime runs on the CPU provider: {why}")
    return CPU


def model_dtype(program: Program) -> torch.dtype:
    """The floating dtype most of the program's weight bytes are in (float32 if none)."""
    sizes: dict[torch.dtype, int] = collections.Counter()
    for t in program.weights.values():
        if t.is_floating_point():
            sizes[t.dtype] += t.numel()
    return max(sizes, key=sizes.get) if sizes else torch.float32


def prepare(program: Program) -> Stats:
    """Apply the ONNX lowering rules (cached attention -> group_query_attention)."""
    from .onnx_attention import RULES

    stats = apply_rules(program, RULES)
    program.recompile()
    return stats


# --- graph -> torch.export -> ONNX ---------------------------------------------------------

def _weights_to_constants(program: Program) -> None:
    """Weight placeholders become get_attr constants (one buffer per distinct tensor)."""
    gm, graph = program.gm, program.graph
    by_tensor: dict[tuple, str] = {}
    first = next(n for n in graph.nodes if n.op != "placeholder") if len(graph.nodes) else None
    for node in [n for n in graph.nodes if n.op == "placeholder" and n.name in program.weights]:
        tensor = program.weights[node.name]
        key = tensor_key(tensor)
        name = by_tensor.get(key)
        if name is None:
            name = f"_llmc_w_{len(by_tensor)}_{node.name}"[:120]
            gm.register_buffer(name, tensor, persistent=False)
            by_tensor[key] = name
        with graph.inserting_before(first):
            attr = graph.get_attr(name)
        attr.meta["val"] = node.meta.get("val")
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    program.weights.clear()


def _symbols_to_sizes(graph: fx.Graph) -> None:
    """SymInt placeholders (Dynamo's dynamic sizes) become ``sym_size`` of a tensor input."""
    tensors = [n for n in graph.nodes if n.op == "placeholder"
               and isinstance(n.meta.get("val"), torch.Tensor)]
    for node in [n for n in graph.nodes if n.op == "placeholder"]:
        val = node.meta.get("val")
        if not isinstance(val, torch.SymInt):
            continue
        if not node.users:  # read only by values the host computes (see _host_outputs)
            graph.erase_node(node)
            continue
        source = next(((t, d) for t in tensors for d, s in enumerate(t.meta["val"].shape)
                       if isinstance(s, torch.SymInt) and s.node.expr == val.node.expr), None)
        if source is None:
            raise OnnxLoweringError(f"size input %{node.name} ({val}) is not the size of any "
                                    "tensor input; ONNX cannot take it")
        with graph.inserting_after(source[0]):
            size = graph.call_function(torch.ops.aten.sym_size.int, source)
        size.meta["val"] = val
        node.replace_all_uses_with(size)
        graph.erase_node(node)
    graph.eliminate_dead_code()


def _dynamic_shapes(inputs: Sequence[fx.Node]) -> tuple:
    from torch.export import Dim

    shapes = []
    for node in inputs:
        val = node.meta.get("val")
        dims = {i: Dim.DYNAMIC for i, s in enumerate(getattr(val, "shape", ()))
                if not isinstance(s, int)}
        shapes.append(dims or None)
    return tuple(shapes)


def _check_supported(program: Program) -> None:
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "_weight_int4pack" in name or "_weight_int8pack" in name or node.target in (
                torch.ops.llmcompile.int4_linear.default,
                torch.ops.llmcompile.int8_linear.default):
            raise OnnxLoweringError(
                f"node %{node.name} ({name}) holds weights packed for the CPU Inductor kernels; "
                "quantize with target 'onnxruntime' so the pass emits MatMulNBits weights")


@dataclass
class OnnxModel:
    """An exported file and what the lowering did on the way."""

    path: Path
    notes: list[str] = field(default_factory=list)
    #: graph output index -> input index it updates in place (a static KV cache): the
    #: extra outputs after the graph's own
    mutations: dict[int, int] = field(default_factory=dict)
    #: ONNX output index of each of the graph's outputs, in order
    user_outputs: list[int] = field(default_factory=list)
    #: how the file was written: "direct" (:mod:`.onnx_emit`) or "traced" (torch.export, then
    #: torch.onnx.export)
    way: str = "direct"


def to_onnx(program: Program, args: Sequence[Any], path: str | os.PathLike, *,
            provider: str = CPU, input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = None, dynamic_shapes: Any = None,
            direct: bool = True) -> OnnxModel:
    """Export the (prepared) program to an ONNX file at ``path`` (weights as external data).

    ``args`` are example values of the program's non-weight inputs, in order; by default every
    dimension that is symbolic in the graph is dynamic.
    """
    _check_supported(program)
    dtype = model_dtype(program)
    table, notes = translation_table(provider, dtype)
    notes += sparse_attention_notes(program.graph)
    _symbols_to_sizes(program.graph)
    program.graph._codegen = fx.graph.CodeGen()  # flat positional inputs, not a pytree
    mutations = _return_mutated_inputs(program)
    if mutations and output_names:
        raise OnnxLoweringError("a file for deployment must not write its inputs in place")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    if direct:
        try:
            registry = onnx_emit.registry(OPSET, table, (provider, dtype))
            user_outputs = onnx_emit.emit(program, path, registry, input_names=input_names,
                                          output_names=output_names)
            return OnnxModel(path, notes, mutations, user_outputs, "direct")
        except onnx_emit.NotDirect as e:
            log.info("llmcompile: ONNX through torch.export + torch.onnx.export: %s", e)
    _weights_to_constants(program)
    program.recompile()
    inputs = [n for n in program.graph.nodes if n.op == "placeholder"]
    if len(inputs) != len(args):
        raise OnnxLoweringError(f"the graph takes {len(inputs)} inputs, {len(args)} given")
    if dynamic_shapes is None:
        dynamic_shapes = _dynamic_shapes(inputs)
    params = inspect.signature(program.gm.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        dynamic_shapes = (tuple(dynamic_shapes),)  # GraphModule.forward(*args)
    with _compat.no_tracing_context(), torch.no_grad():
        try:
            ep = torch.export.export(program.gm, tuple(args), dynamic_shapes=dynamic_shapes,
                                     strict=False)
        except Exception as e:
            raise OnnxLoweringError(f"torch.export of the rewritten graph failed: "
                                    f"{str(e).splitlines()[0][:300]}") from e
    with _quiet(), _compat.onnx_quiet(), _compat.no_tracing_context():
        try:
            onnx_program = torch.onnx.export(
                ep, tuple(args), dynamo=True, custom_translation_table=table,
                opset_version=OPSET, optimize=False, verbose=False, report=False,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None)
        except Exception as e:
            raise OnnxLoweringError(_export_failure(e)) from e
    user_outputs = _io_map(onnx_program, bool(output_names))
    onnx_program.save(str(path), external_data=True)
    return OnnxModel(path, notes, mutations, user_outputs, "traced")


def sparse_attention_notes(graph: fx.Graph) -> list[str]:
    """Why attention with sinks or blocks leaves the contrib ops (said in the export notes)."""
    from ..core.pattern import arguments

    sinks = blocks = 0
    for node in graph.nodes:
        if node.target is torch.ops.llmcompile.attention.default:
            args = arguments(node)
            sinks += bool(args[7])
            blocks += bool(args[8])
    notes = []
    if sinks:
        notes.append(f"{sinks} attention layer(s) with attention sinks: emitted as standard ONNX "
                     "ops (a keep-mask from sizes, MatMul, Softmax); GroupQueryAttention's "
                     "local_window_size has no kept first tokens, and its sink input is a "
                     "learned per-head logit, not StreamingLLM's sinks")
    if blocks:
        notes.append(f"{blocks} block-sparse attention layer(s): emitted as standard ONNX ops "
                     "(com.microsoft.SparseAttention runs on CUDA only and is not emitted yet)")
    return notes


def _io_map(onnx_program, renamed: bool) -> list[int]:
    """ONNX output index of each graph output, in order. The exporter lists each distinct value
    once (and drops input-mutation outputs), so outputs are matched by name."""
    from torch.export.graph_signature import OutputKind

    sig = onnx_program.exported_program.graph_signature
    names = [o.name for o in onnx_program.model.graph.outputs]
    user: list[int] = []
    for spec in sig.output_specs:
        if spec.kind == OutputKind.BUFFER_MUTATION:
            raise OnnxLoweringError(f"the graph writes its constant {spec.target} in place")
        if spec.kind == OutputKind.USER_OUTPUT:
            user.append(len(user) if renamed else names.index(spec.arg.name))
    return user


def _return_mutated_inputs(program: Program) -> dict[int, int]:
    """Inputs the graph writes in place (a static KV cache) become extra outputs, since the
    exporter drops in-place writes to inputs; returns output index -> input index (among the
    inputs that are not weights)."""
    from ..core.program import mutated_inputs

    written = mutated_inputs(program.graph)
    if not written:
        return {}
    inputs = [n for n in program.graph.nodes if n.op == "placeholder"
              and n.name not in program.weights]  # the file's inputs; weights are stored
    output = next(n for n in program.graph.nodes if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    extra = [n for n in inputs if n in written]
    output.args = ((*outs, *extra),)
    return {len(outs) + j: inputs.index(n) for j, n in enumerate(extra)}


def _export_failure(e: BaseException) -> str:
    while e.__cause__ is not None:  # the exporter wraps the real error; report that one
        e = e.__cause__
    text = f"{type(e).__name__}: {e}"
    for line in text.splitlines():
        if "No decompositions registered" in line or "Unsupported FX nodes" in line:
            return f"torch.onnx.export: {line.strip()[:400]}"
    return f"torch.onnx.export failed: {text.splitlines()[0][:400] if text else type(e)}"


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress lines to stdout; keep them out of users' logs."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


# --- running -------------------------------------------------------------------------------

def session(path: str | os.PathLike, provider: str, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = [provider] if provider == CPU else [provider, CPU]
    return ort.InferenceSession(str(path), options, providers=providers)


_NUMPY = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64",
          torch.int32: "int32", torch.bool: "bool", torch.uint8: "uint8", torch.int8: "int8",
          torch.float64: "float64"}


def _host_outputs(program: Program) -> dict[int, Callable[[Sequence[Any]], Any]]:
    """Graph outputs the ONNX graph should not compute leave it and are produced on the host:
    Python numbers (a sliding-window static cache returns its new position counter,
    ``s9 + 1``: ONNX outputs tensors only) from the call's own inputs, and compile-time
    constants (a weight, or a value folded from weights alone) as the tensors themselves.
    Returns output index -> evaluator of the call's arguments."""
    graph = program.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = list(output.args[0]) if isinstance(output.args[0], (list, tuple)) else [output.args[0]]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    host: dict[int, Callable] = {}
    keep = []
    for i, value in enumerate(outs):
        if isinstance(value, fx.Node) and program.is_weight(value):
            host[i] = _returns(program.weight(value))
        elif isinstance(value, fx.Node) and isinstance(value.meta.get("val"), torch.Tensor):
            keep.append(value)
        else:
            host[i] = _evaluator(value, placeholders)
    if host:
        output.args = (tuple(keep),)
        graph.eliminate_dead_code()  # fx keeps in-place writes (a static KV cache)
    return host


def _returns(value: Any) -> Callable[[Sequence[Any]], Any]:
    """An evaluator of a value known at compile time (a constant tensor, a Python number)."""
    return lambda args: value


def _evaluator(value: Any, placeholders: list[fx.Node]) -> Callable[[Sequence[Any]], Any]:
    if not isinstance(value, fx.Node):
        return _returns(value)
    order, todo = [], [value]
    while todo:  # the size-only subgraph computing the value
        node = todo.pop()
        if node in order or node.op == "placeholder":
            continue
        if isinstance(node.meta.get("val"), torch.Tensor):
            raise OnnxLoweringError(f"output %{value.name} is a number computed from tensor "
                                    f"%{node.name}; ONNX outputs only tensors")
        order.append(node)
        todo.extend(node.all_input_nodes)
    order.sort(key=lambda n: list(n.graph.nodes).index(n))
    index = {p: i for i, p in enumerate(placeholders)}
    # a snapshot: the nodes leave the graph (erasing a node clears its arguments)
    steps = [(node, node.target, node.args, node.kwargs) for node in order]

    def evaluate(args: Sequence[Any]) -> Any:
        env = {p: args[i] for p, i in index.items()}
        for node, target, node_args, node_kwargs in steps:
            env[node] = target(*fx.node.map_arg(node_args, env.__getitem__),
                               **fx.node.map_arg(node_kwargs, env.__getitem__))
        return env[value]

    return evaluate


class OrtRunner:
    """Calls an ONNX Runtime session with torch tensors, like any compiled graph."""

    def __init__(self, model: OnnxModel, provider: str, positions: Sequence[int],
                 device: torch.device, host: Mapping[int, Callable] | None = None):
        self.model = model
        self.host = dict(host or {})  # output index -> number computed on the host
        self.provider = provider
        self.positions = list(positions)  # which call arguments are graph inputs
        self.device = device
        try:
            self.session = session(model.path, provider)
        except Exception as e:
            raise OnnxLoweringError(f"ONNX Runtime cannot load the exported graph: "
                                    f"{str(e).splitlines()[0][:400]}") from e
        self.names = [i.name for i in self.session.get_inputs()]
        self._tmp = None  # keeps a temporary folder alive as long as the session

    def __call__(self, *args):
        inputs = [args[i] for i in self.positions]
        numbers = {i: evaluate(args) for i, evaluate in self.host.items()}
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.dtype not in _NUMPY:
                raise OnnxLoweringError(f"ONNX Runtime inputs of dtype {t.dtype} are not "
                                        "supported")
        run_on = torch.device("cuda", self.device.index or 0) if self.provider == CUDA else (
            torch.device("cpu"))
        outs = self._run_bound([t.detach().to(run_on).contiguous() for t in inputs], run_on)
        outs = [outs[i] for i in self.model.user_outputs]
        if run_on != self.device:  # a GPU model on the CPU provider (warned once)
            outs = [o.to(self.device) for o in outs]
        for out_index, input_index in self.model.mutations.items():
            inputs[input_index].copy_(outs[out_index])
        results = outs[: len(outs) - len(self.model.mutations)]
        for index in sorted(numbers):
            results.insert(index, numbers[index])
        return results

    def _run_bound(self, inputs: list[torch.Tensor], device: torch.device
                   ) -> list[torch.Tensor]:
        """IO binding on the tensors' own memory; outputs shared back through DLPack (no host
        round trip on CUDA, no copy on CPU)."""
        import numpy as np

        binding = self.session.io_binding()
        kind, index = device.type, device.index or 0
        for name, t in zip(self.names, inputs):
            binding.bind_input(name, kind, index, np.dtype(_NUMPY[t.dtype]), tuple(t.shape),
                               t.data_ptr())
        for o in self.session.get_outputs():
            binding.bind_output(o.name, kind, index)
        self.session.run_with_iobinding(binding)
        outs = []
        for value in binding.get_outputs():
            try:
                outs.append(torch.from_dlpack(value))
            except Exception:  # an onnxruntime build without DLPack on OrtValue
                _warn_once("this onnxruntime build cannot share outputs through DLPack; "
                           "outputs are copied through the host")
                outs.append(torch.from_numpy(value.numpy()).to(device))
        return outs


def _graph_key(program: Program, fingerprint: str, provider: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(provider.encode())
    h.update(program.gm.code.encode())
    for node in program.graph.nodes:
        if node.op == "placeholder":
            h.update(str(node.meta.get("val")).encode())
    for name, t in program.weights.items():
        h.update(f"{name}:{t.data_ptr()}:{tuple(t.shape)}:{t.dtype}".encode())
    # constants the passes made (folded, packed) derive from these weights and the recipe
    return h.hexdigest()


def compile_onnxruntime(program: Program, example_inputs: Sequence[Any], *,
                        fingerprint: str = "") -> OrtRunner:
    """An ONNX Runtime session for the rewritten program; cached per graph + recipe."""
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    positions = [i for i, n in enumerate(placeholders) if n.name not in program.weights
                 and isinstance(n.meta.get("val"), torch.Tensor)]
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    device = tensors[0].device if tensors else torch.device("cpu")
    provider = pick_provider(device)
    key = _graph_key(program, fingerprint, provider)
    if key in _SESSIONS:
        _SESSIONS.move_to_end(key)
        return _SESSIONS[key]
    prepare(program)
    host = _host_outputs(program)
    args = [_example(example_inputs[i], placeholders[i]) for i in positions]
    tmp = tempfile.TemporaryDirectory(prefix="llmcompile-ort-")
    model = to_onnx(program, args, Path(tmp.name) / "graph.onnx", provider=provider)
    for note in model.notes:
        log.info("llmcompile: %s", note)
    runner = OrtRunner(model, provider, positions, device, host)
    runner._tmp = tmp
    _SESSIONS[key] = runner
    while len(_SESSIONS) > _MAX_SESSIONS:
        _SESSIONS.popitem(last=False)
    return runner


def _example(value: Any, node: fx.Node) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise OnnxLoweringError(f"input %{node.name} is {type(value).__name__}, not a tensor")
    return value.detach()
