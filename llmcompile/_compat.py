"""Every private torch API, and every transformers difference between versions, in one place.

Supported: torch 2.11 – 2.14, transformers 5.0 – 5.x. Keep this module small: if a release moves
one of these, only this file changes (tests/core/test_compat.py names the versions).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

try:  # public home since 2.5; keep the fallback for older nightlies
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
except ImportError:  # pragma: no cover - torch < 2.5 is not supported
    raise ImportError("llmcompile needs torch>=2.11 (torch._inductor.custom_graph_pass)") from None

from torch._inductor.compile_fx import compile_fx as _compile_fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

__all__ = [
    "CustomGraphPass",
    "compile_fx",
    "detect_fake_mode",
    "fake_mode_for",
    "get_hash_for_files",
    "inductor_config",
    "mode_options",
    "no_tracing_context",
    "real_tensors",
    "same_shape",
    "trace_aten",
    "cache_counters",
    "cache_kwarg",
    "cpp_wrapper_options",
    "dynamo_frame_objects",
    "hash_by_metadata",
    "mark_dynamic_length",
    "mark_cacheable",
    "causal_lm_model_types",
    "dynamo_counters",
    "recompile_limit",
    "set_cache_length",
    "tokenizer_path",
]

inductor_config = torch._inductor.config


def detect_fake_mode(values: Sequence[Any]):
    """The fake mode (with its shape environment) that ``values`` belong to, or None."""
    return torch._guards.detect_fake_mode(values)


def fake_mode_for(values: Sequence[Any]):
    """Dynamo's own fake mode if the values carry one, else a fresh one with a shape env."""
    mode = detect_fake_mode(values)
    if mode is not None:
        return mode
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    return FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)


def static_fake_mode():
    """A fake mode without a shape env: traced shapes stay the example's (a decode step)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def trace_aten(fn: Callable, args: Sequence[Any], fake_mode) -> fx.GraphModule:
    """Trace ``fn`` to the normalized pre-dispatch ATen IR (linear, SDPA, silu survive).

    ``args`` are fake tensors of ``fake_mode`` (or scalars); nodes get ``meta["val"]`` in the
    same symbols, and ``nn_module_stack`` survives when ``fn`` runs an ``fx.Interpreter``.
    """
    ctx = fake_mode if fake_mode is not None else contextlib.nullcontext()
    with ctx, fx.traceback.preserve_node_meta():
        return make_fx(fn, pre_dispatch=True, tracing_mode="fake")(*args)


def compile_fx(gm: fx.GraphModule, example_inputs: Sequence[Any], config_patches=None):
    """Inductor's entry point that accepts a pre-dispatch graph (it runs AOTAutograd)."""
    return _compile_fx(gm, list(example_inputs), config_patches=config_patches or {})


def mark_cacheable(functions: Sequence[Callable], version: str) -> None:
    """Let AOTAutograd's cache keep graphs that call these plain Python functions (our
    lowerings' wrappers around registered ops): it refuses unknown ``call_function`` targets.
    ``version`` (a hash of their sources) joins the cache key, so an edit recompiles."""
    table = torch._inductor.config.unsafe_marked_cacheable_functions
    for fn in functions:
        table[f"{fn.__module__}.{fn.__name__}"] = version


def dynamo_frame_objects(roots: Sequence[str]) -> list[Any]:
    """The objects Dynamo's root expressions (``L['self']``, ``L['args'][0]``, ``G['model']``)
    name in the frame being compiled, while a backend runs inside Dynamo; [] elsewhere."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        scope = {"L": tx.f_locals, "G": tx.f_globals}
    except Exception:  # not inside Dynamo, or its internals moved
        return []
    found = []
    for root in roots:
        if root.startswith(("L[", "G[")):
            try:
                found.append(eval(root, {"__builtins__": {}}, scope))  # Dynamo's own source text
            except Exception:
                continue
    return found


def mark_dynamic_length(tensor: torch.Tensor, dim: int) -> None:
    """Compile the next graph for any size >= 2 of ``tensor``'s ``dim`` (a prompt length) at
    once, rather than for the first size and again, dynamic, on the next one."""
    torch._dynamo.mark_dynamic(tensor, dim)


def hash_by_metadata(tensor: torch.Tensor) -> None:
    """Let torch's compile caches key a graph constant (a folded or packed weight, read through
    ``get_attr``) by its shape and dtype, not its values: otherwise every constant is turned
    into a Python list to hash it (seconds and GBs for a real model) on each compile, warm or
    cold. Safe here: AOTAutograd lifts the graph module's buffers to inputs, so the compiled
    code reads the values at call time (torch marks frozen parameters the same way)."""
    tensor._is_frozen_param = True  # type: ignore[attr-defined]


def cache_counters() -> dict[str, int]:
    """Hits, misses and bypasses of Inductor's FX graph cache and AOTAutograd's cache so far
    in this process."""
    from torch._dynamo.utils import counters

    keys = {"fxgraph_cache_hit": "inductor", "fxgraph_cache_miss": "inductor",
            "fxgraph_cache_bypass": "inductor", "autograd_cache_hit": "aot_autograd",
            "autograd_cache_miss": "aot_autograd", "autograd_cache_bypass": "aot_autograd"}
    return {k: int(counters[group].get(k, 0)) for k, group in keys.items()}


def cpp_wrapper_options() -> dict[str, Any]:
    """Inductor config for the C++ wrapper: the wrapper (one call per kernel of the whole
    model) is built apart from the kernels, at a low optimisation level; measured on SmolLM2
    int4's decode step: 110 -> 34 s to compile, decode speed unchanged (BENCHMARKS.md)."""
    options: dict[str, Any] = {"cpp_wrapper": True}
    if hasattr(inductor_config, "cpp_wrapper_build_separate"):
        options["cpp_wrapper_build_separate"] = True
    return options


def mode_options(mode: str | None) -> dict[str, Any]:
    """Inductor config patches for a ``torch.compile`` mode name."""
    if mode in (None, "default"):
        return {}
    return dict(torch._inductor.list_mode_options(mode))


def no_tracing_context():
    """Run ``torch.export`` inside a backend without polluting Dynamo's guards."""
    return torch._guards.tracing(None)


def real_tensors():
    """Make real tensors inside a backend (loading a file, computing a constant): the fake mode
    Dynamo traces under is suspended."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    stack = contextlib.ExitStack()
    stack.enter_context(unset_fake_temporarily())
    stack.enter_context(torch._guards.tracing(None))  # torch.load reads the tracing context
    return stack


def same_shape(a: Sequence, b: Sequence) -> bool:
    """True when two (possibly symbolic) shapes are provably equal."""
    if len(a) != len(b):
        return False
    return all(statically_known_true(x == y) for x, y in zip(a, b))


def cache_kwarg(model: Any) -> str:
    """The keyword a transformers causal LM takes its KV cache by: ``cache`` where the installed
    version has renamed it (5.24 warns that ``past_key_values`` goes away in 5.40), else
    ``past_key_values``. ``model`` is the module or its (compiled) forward."""
    owner = getattr(model, "__self__", model)  # a bound forward -> its module
    forward = getattr(owner, "forward", owner)
    forward = getattr(forward, "_torchdynamo_orig_callable", forward)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def causal_lm_model_types() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class (the auto
    mapping's private table; 5.x keeps it in ``models.auto.modeling_auto``)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tokenizer_path(model: Any) -> str | None:
    """A transformers model's own folder (``config._name_or_path``), where its tokenizer usually
    lives, or None. ``model`` is the module or its bound forward."""
    owner = getattr(model, "__self__", model)  # a bound forward -> its module
    path = getattr(getattr(owner, "config", None), "_name_or_path", "") or ""
    return path if path and os.path.isdir(path) else None


def dynamo_counters() -> tuple[int, int]:
    """(unique graphs compiled, graph breaks) so far in this process (Dynamo's counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def set_cache_length(cache, length: int) -> None:
    """Roll every layer of a transformers ``StaticCache`` to ``length`` valid positions.

    transformers 5.2x writes each layer at its own ``cumulative_length`` counter (not at
    ``cache_position``); older releases write at ``cache_position`` and have no counter, where
    this is a no-op. Later positions stay stale but masked, and the next write replaces them.
    """
    for layer in getattr(cache, "layers", ()):
        counter = getattr(layer, "cumulative_length", None)
        if isinstance(counter, torch.Tensor):
            counter.fill_(length)


def init_static_cache(cache, model) -> None:
    """Allocate a transformers ``StaticCache``'s tensors now rather than on the first write.

    A lazily initialised cache makes Dynamo guard on ``is_initialized``: the first prefill's
    graph then fails that guard on the next call and everything compiled around it is compiled
    again. Releases without ``early_initialization`` keep the lazy path."""
    early = getattr(cache, "early_initialization", None)
    if early is None or getattr(cache, "is_initialized", False):
        return
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = (getattr(config, "head_dim", None)
                or config.hidden_size // config.num_attention_heads)
    param = next(model.parameters())
    early(batch_size=1, num_heads=heads, head_dim=head_dim, dtype=param.dtype,
          device=param.device)


@contextlib.contextmanager
def recompile_limit(at_least: int):
    """Let Dynamo keep at least ``at_least`` compiled versions of one code object."""
    config = torch._dynamo.config
    with config.patch(recompile_limit=max(config.recompile_limit, at_least)):
        yield


# --- torch.onnx's translator, driven on a graph we already hold (lower/onnx_emit.py) --------

@contextlib.contextmanager
def onnx_quiet():
    """torch.onnx warns once per node without ``nn_module_stack`` (ours carry none after a
    rewrite) and once per missing torchvision op: not the user's concern."""
    loggers = [logging.getLogger(f"torch.onnx._internal.exporter.{m}")
               for m in ("_core", "_registration")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def onnx_registry(opset: int, table: dict) -> Any:
    """torch.onnx's table of ATen -> ONNX translations (torchlib) plus ``table``'s."""
    from torch.onnx._internal.exporter import _registration

    with onnx_quiet():
        registry = _registration.ONNXRegistry.from_torchlib(opset_version=opset)
    for op, fn in table.items():
        registry.register_op(op, fn, is_complex=False)
    return registry


def onnx_translatable(registry: Any, target: Any) -> bool:
    return bool(registry.get_decomps(target))


def onnx_translate(graph: fx.Graph, registry: Any, producer: str, opset: int
                   ) -> tuple[Any, dict]:
    """Translate an ATen FX graph (every node with ``meta["val"]``) to an ``onnx_ir`` model,
    node by node, with torch.onnx's translations: ``(model, FX node name -> value(s))``. The
    model's inputs are the graph's placeholders, its outputs the graph's outputs."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _constants, _core, _ir_passes

    model = ir.Model(ir.Graph([], [], nodes=[], name="main_graph"),
                     ir_version=_constants.ONNX_IR_VERSION, producer_name=producer)
    with onnx_quiet():
        values = _core._translate_fx_graph(graph, model, graph_like=model.graph,
                                           owned_graphs={}, lower="at_conversion",
                                           registry=registry)
    model.opset_imports[""] = opset  # the registry's; torch.onnx would write 18, then convert
    _ir_passes.add_opset_imports(model)
    return model, values


def onnx_tensor(tensor: torch.Tensor, name: str) -> Any:
    """An ``onnx_ir`` tensor over a torch tensor's memory (written out by the model's save)."""
    from torch.onnx._internal.exporter._core import TorchTensor

    return TorchTensor(tensor, name=name)


def onnx_save(model: Any, path: str) -> None:
    """Save an ``onnx_ir`` model with its initializers as external data beside ``path``."""
    from torch.onnx._internal.exporter import _onnx_program

    _onnx_program.ONNXProgram(model, None).save(path, external_data=True)
