"""``llmcompile.export``: a transformers causal LM + a recipe -> an ONNX file for deployment.

The file takes ``input_ids [batch, sequence]``, ``position_ids [batch, sequence]`` and, per
layer, ``past_key_values.{i}.key/value [batch, kv_heads, past_sequence, head_dim]``; it returns
``logits [batch, sequence, vocab]`` and ``present.{i}.key/value`` (past + new), so a generation
loop (:class:`~llmcompile.deploy.runner.OnnxCausalLM`) can drive it. Batch, sequence and past
length are dynamic. Rows of a batch must have equal lengths (no padding mask).

The model is captured with ``torch.export`` while its attention runs through
``llmcompile.attention`` (causal, no mask tensor), the recipe's passes run as for
``torch.compile``, and the result is lowered to ONNX Runtime contrib ops. Weights are written
as external data next to the file; a ``<name>.llmcompile.json`` sidecar describes the I/O and
``genai_config.json`` lets ONNX Runtime GenAI run the folder (:mod:`.genai`).

A recipe with an ``early_exit`` pass (exit after layer ``L``) writes two files: ``<name>.onnx``,
the full model (the verifier), and ``<name>.draft.onnx``, the draft graph (layers ``0..L-1``,
then the model's own final norm and LM head) whose past / present are those of the first ``L``
layers only. Both share one external data file: each draft tensor whose bytes are in
``<name>.onnx.data`` (matched by content) points there, and only tensors of the draft alone
(a distilled exit adapter) go to a small ``<name>.draft.onnx.data``. The sidecar's ``draft``
section names the file, the exit layer and ``draft_tokens``; ``OnnxCausalLM`` then decodes
self-speculatively (same tokens as greedy decoding with the full model).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from ..core.pipeline import PassRun, Report, run_pipeline
from ..core.program import add_seconds, capture_export
from ..core.recipe import Recipe, RecipeError
from ..lower.onnxruntime import OnnxLoweringError, model_dtype, prepare, to_onnx
from ..ops.onnx import CPU
from .genai import context_length, text_config, write_genai_config
from .generate import _with_exit, early_exit_config

log = logging.getLogger("llmcompile")

__all__ = ["ExportResult", "export"]

ATTENTION = "llmcompile_causal"


@dataclass
class ExportResult:
    path: Path
    report: Report
    sidecar: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    #: an early-exit recipe's draft file (its weights in the full model's data) and report
    draft: Path | None = None
    draft_report: Report | None = None
    #: wall seconds per stage: ``capture`` (torch.export), ``recipe`` (its passes, calibration
    #: excluded), ``calibration`` (calibrated recipes), ``lowering`` (the ONNX lowering rules),
    #: ``writing`` (translation and saving), ``checking`` (onnx.checker), ``files`` (sidecar,
    #: genai_config.json, tokenizer); a draft's stages are added in
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        """The ONNX file plus its external data."""
        return _file_bytes(self.path)

    @property
    def draft_bytes(self) -> int:
        """What the draft adds on disk: its file and its own external data (0: no draft)."""
        return _file_bytes(self.draft) if self.draft is not None else 0


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0,
               scaling: float | None = None, sliding_window: int | None = None,
               softcap: float | None = None, s_aux=None, **kwargs):
    """transformers attention interface: causal attention as one ``llmcompile.attention``."""
    from .. import ops

    if softcap is not None or s_aux is not None:
        raise OnnxLoweringError("attention with logit soft-capping or sinks cannot be exported "
                                "(GroupQueryAttention has neither)")
    if not getattr(module, "is_causal", True):
        raise OnnxLoweringError("only causal (decoder) attention can be exported")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = ops.attention(query, key, value, None, scale, True, int(sliding_window or 0))
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _causal_attention(model):
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _attention)
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                 "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    for c in configs:
        c._attn_implementation = ATTENTION
    try:
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s


class _CausalLM(torch.nn.Module):
    """Flat tensors in and out: (ids, positions, *past) -> (logits, *present)."""

    def __init__(self, model, layers: int):
        super().__init__()
        self.model, self.layers = model, layers

    def forward(self, input_ids, position_ids, past):
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, position_ids=position_ids,
                         **{_compat.cache_kwarg(self.model): cache},
                         use_cache=True)
        present = []
        for layer in cache.layers[: self.layers]:
            present += [layer.keys, layer.values]
        return (out.logits, *present)


def _geometry(config) -> dict[str, int]:
    text = text_config(config)
    layers = text.num_hidden_layers
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim,
            "vocab_size": text.vocab_size}


def _names(layers: int) -> tuple[list[str], list[str]]:
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return ["input_ids", "position_ids", *past], ["logits", *present]


def _dtype_device(module) -> tuple[torch.dtype, torch.device]:
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    return dtype, device


def capture_causal_lm(module, geometry: dict, cache_layers: int | None = None
                      ) -> tuple[Any, tuple, tuple]:
    """``torch.export`` of ``module`` with the file's I/O (:class:`_CausalLM`), dynamic batch,
    sequence and past length: ``(exported program, example args, dynamic shapes)``.
    ``cache_layers``: past / present of the first that many layers only (an early-exit draft);
    default all."""
    from torch.export import Dim

    layers = geometry["layers"] if cache_layers is None else cache_layers
    dtype, device = _dtype_device(module)
    batch, seq, past_len = 2, 3, 4  # not 0 or 1: export would specialize those sizes
    ids = torch.randint(0, geometry["vocab_size"], (batch, seq), device=device)
    positions = (torch.arange(seq, device=device) + past_len).expand(batch, seq).contiguous()
    past = tuple(torch.randn(batch, geometry["kv_heads"], past_len, geometry["head_dim"],
                             dtype=dtype, device=device) for _ in range(2 * layers))
    b, s, p = Dim("batch"), Dim("sequence"), Dim("past_sequence")
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, tuple({0: b, 2: p} for _ in past))
    args = (ids, positions, past)
    with torch.no_grad():
        ep = torch.export.export(_CausalLM(module, layers).eval(), args,
                                 dynamic_shapes=dynamic, strict=False)
    return ep, args, dynamic


def capture_program(module, geometry: dict, cache_layers: int | None = None
                    ) -> tuple[Any, tuple, tuple]:
    """The file's program: :func:`capture_causal_lm` with attention as one causal
    ``llmcompile.attention`` per layer, as a :class:`Program` (module paths as in the model),
    its example args and dynamic shapes. Raises when a layer computes attention by hand (its
    causal mask would be lost)."""
    with _causal_attention(module):
        ep, args, dynamic = capture_causal_lm(module, geometry, cache_layers)
    layers = geometry["layers"]
    routed = sum(n.target is torch.ops.llmcompile.attention.default for n in ep.graph.nodes)
    if routed != layers:
        raise OnnxLoweringError(
            f"{type(module).__name__}: {routed} of {layers} layers run attention through "
            "transformers' attention interface; the others compute it by hand and would lose "
            "their causal mask, so this architecture cannot be exported")
    return capture_export(ep, root="model."), args, dynamic  # _CausalLM.model: model paths


def write_sidecar(path: Path, module, **extra: Any) -> dict[str, Any]:
    """``<name>.llmcompile.json`` beside ``path``: geometry, dtype, I/O names (the runner's)."""
    geometry = _geometry(module.config)
    inputs, outputs = _names(geometry["layers"])
    sidecar = {**geometry, "dtype": str(_dtype_device(module)[0]).removeprefix("torch."),
               "inputs": inputs, "outputs": outputs,
               "eos_token_id": getattr(module.config, "eos_token_id", None), **extra}
    path.with_name(path.stem + ".llmcompile.json").write_text(json.dumps(sidecar, indent=2))
    return sidecar


def _rename_dims(path: Path, layers: int) -> None:
    """Give the dynamic axes readable names (batch, sequence, past_sequence, total_sequence)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    rename: dict[str, str] = {}

    def take(value, axis: int, name: str) -> None:
        dim = value.type.tensor_type.shape.dim[axis]
        if dim.dim_param and dim.dim_param not in rename:
            rename[dim.dim_param] = name

    inputs = {v.name: v for v in graph.input}
    take(inputs["input_ids"], 0, "batch")
    take(inputs["input_ids"], 1, "sequence")
    if layers:
        take(inputs["past_key_values.0.key"], 2, "past_sequence")
        take(next(o for o in graph.output if o.name == "present.0.key"), 2, "total_sequence")
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]
    onnx.save(model, str(path))


def export(model: torch.nn.Module, path: str | Path, recipe: Recipe, *, tokenizer: Any = None,
           provider: str = CPU, check: bool = True) -> ExportResult:
    """Export a causal LM rewritten by ``recipe`` to ``path`` (``.onnx`` + ``.onnx.data``).

    ``model`` is a transformers causal LM (``llmcompile.export`` also takes ``"smollm2"``, a
    tiny architecture name or a folder). ``tokenizer`` (or its path) is needed by calibrated
    recipes and is saved next to the file. ``provider`` picks which contrib ops to emit (those
    it has kernels for); the file runs on any provider that has them.
    """
    import onnx

    started = time.perf_counter()
    module = model.eval()
    if tokenizer is None:
        tokenizer = _compat.tokenizer_path(module)
    geometry = _geometry(module.config)
    layers = geometry["layers"]
    exit_config = early_exit_config(recipe)
    if exit_config is not None:
        exit_config.check_model(layers)
        if exit_config.mode != "speculative":
            raise RecipeError(f"early_exit.mode {exit_config.mode!r}: llmcompile.export writes "
                              "the draft of self-speculative decoding (mode 'speculative') only")
        changes: dict[str, Any] = {"graph": "draft", "layers": (exit_config.exit_layer,)}
        if exit_config.head == "distilled":  # trained on first use, as llmcompile.generate does
            from .exit_heads import adapter_files

            changes["adapter"] = adapter_files(module, exit_config, tokenizer)[
                exit_config.exit_layer]
        draft_recipe = _with_exit(recipe, exit_config, **changes)
        recipe = _with_exit(recipe, exit_config, graph="full")
    path = Path(path)
    seconds: dict[str, float] = {}
    program, report, result = _export_graph(module, recipe, path, geometry, tokenizer,
                                            provider, seconds=seconds)
    if check:
        with add_seconds(seconds, "checking"):
            onnx.checker.check_model(str(path), full_check=True)
    extra: dict[str, Any] = {}
    notes = list(result.notes)
    draft = draft_report = None
    if exit_config is not None:
        draft = path.with_name(path.stem + ".draft.onnx")
        exit_layer = exit_config.exit_layer
        _, draft_report, draft_result = _export_graph(module, draft_recipe, draft, geometry,
                                                      tokenizer, provider, exit_layer,
                                                      seconds=seconds)
        with add_seconds(seconds, "writing"):
            shared, own = _share_external_data(draft, path)
        if check:
            with add_seconds(seconds, "checking"):
                onnx.checker.check_model(str(draft), full_check=True)
        notes += [n for n in draft_result.notes if n not in notes]
        notes.append(f"draft {draft.name} (layers 0..{exit_layer - 1} + exit head): "
                     f"{shared} weight bytes read from {path.name}.data, {own} of its own")
        inputs, outputs = _names(exit_layer)
        extra["draft"] = {"file": draft.name, "exit_layer": exit_layer,
                          "draft_tokens": exit_config.draft_tokens, "layers": exit_layer,
                          "inputs": inputs, "outputs": outputs,
                          "rules": draft_report.counts()}
    with add_seconds(seconds, "files"):
        sidecar = write_sidecar(path, module, recipe=recipe.name, rules=report.counts(),
                                weights_dtype=str(model_dtype(program)), **extra)
        write_genai_config(path, module, sidecar, provider)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, path.parent)
    log.info("llmcompile export: done in %.0f s (%s)", time.perf_counter() - started,
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return ExportResult(path, report, sidecar, notes, draft, draft_report, seconds)


def _export_graph(module, recipe: Recipe, path: Path, geometry: dict, tokenizer: Any,
                  provider: str, cache_layers: int | None = None, *,
                  seconds: dict[str, float]):
    """Capture, rewrite and write one file: ``(program, report, OnnxModel)``. ``cache_layers``:
    the file's past / present are the first that many layers' (a draft); default all. Adds
    each stage's wall time to ``seconds``."""
    layers = geometry["layers"] if cache_layers is None else cache_layers
    log.info("llmcompile export: capturing %s (%d layers) with torch.export",
             type(module).__name__, geometry["layers"])
    with add_seconds(seconds, "capture"):
        program, args, dynamic = capture_program(module, geometry, cache_layers)
    program.context.update(target="onnxruntime", tokenizer=tokenizer, model=module,
                           max_positions=context_length(module.config))
    log.info("llmcompile export: running recipe %r", recipe.name)
    with add_seconds(seconds, "recipe"):
        report = run_pipeline(program, recipe)
    calibration = program.seconds.get("calibration", 0.0)
    if calibration:
        seconds["recipe"] -= calibration
        seconds["calibration"] = seconds.get("calibration", 0.0) + calibration
    if cache_layers is not None:  # the draft: the later layers' weights are unused now
        for node in [n for n in program.graph.nodes if n.op == "placeholder"
                     and n.name in program.weights and not n.users]:
            program.graph.erase_node(node)
            del program.weights[node.name]
        program.recompile()
    start = time.perf_counter()
    report.runs.append(PassRun("lower", "onnx_attention", prepare(program),
                               time.perf_counter() - start))
    seconds["lowering"] = seconds.get("lowering", 0.0) + report.runs[-1].seconds
    input_names, output_names = _names(layers)
    log.info("llmcompile export: writing %s", path)
    with add_seconds(seconds, "writing"):
        result = to_onnx(program, [*args[:2], *args[2]], path, provider=provider,
                         input_names=input_names, output_names=output_names,
                         dynamic_shapes=(*dynamic[:2], *dynamic[2]))
        _rename_dims(path, layers)
    return program, report, result


# --- one set of weights for the draft and the full model ------------------------------------

def _tensors(graph) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers and node attributes, subgraphs too."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for sub in attr.graphs:
                yield from _tensors(sub)


def _external(path: Path) -> tuple[Any, list[tuple[Any, dict[str, str]]]]:
    """The model at ``path`` (no weights loaded) and its tensors held in external data, each
    with its ``location`` / ``offset`` / ``length``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    held = [(t, {e.key: e.value for e in t.external_data}) for t in _tensors(model.graph)
            if t.data_location == onnx.TensorProto.EXTERNAL]
    return model, held


def _read(folder: Path, info: dict[str, str]) -> bytes:
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info.get("length", -1)))


def _point(tensor, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, str(value)


def _share_external_data(draft: Path, full: Path) -> tuple[int, int]:
    """Point the draft's tensors into the full model's external data wherever their bytes are
    the same (matched by length and SHA-256); the others, the draft's own (an adapter), go to
    ``<draft>.data``, which is removed when there are none. Returns (shared, own) bytes."""
    import onnx

    folder = draft.parent
    model, mine = _external(draft)
    keys = [(len(blob), hashlib.sha256(blob).digest())
            for blob in (_read(folder, info) for _, info in mine)]
    lengths = {length for length, _ in keys}
    theirs: dict[tuple[int, bytes], dict[str, str]] = {}
    for _, info in _external(full)[1]:
        if int(info.get("length", -1)) in lengths:
            blob = _read(folder, info)
            theirs.setdefault((len(blob), hashlib.sha256(blob).digest()), info)
    own = draft.with_name(draft.name + ".data")
    staged = own.with_name(own.name + ".tmp")
    shared = written = 0
    with open(staged, "wb") as out:
        for (tensor, info), key in zip(mine, keys):
            match = theirs.get(key)
            if match is not None:
                _point(tensor, match["location"], int(match.get("offset", 0)), key[0])
                shared += key[0]
                continue
            out.write(b"\0" * (-out.tell() % 64))  # aligned, like the exporter's
            _point(tensor, own.name, out.tell(), key[0])
            out.write(_read(folder, info))
            written += key[0]
    own.unlink(missing_ok=True)
    if written:
        staged.replace(own)
    else:
        staged.unlink()
    onnx.save(model, str(draft))
    return shared, written


def _save_tokenizer(tokenizer: Any, folder: Path) -> None:
    if isinstance(tokenizer, (str, Path)):
        from ..quant.calibrate import load_tokenizer

        tokenizer = load_tokenizer(tokenizer)
    tokenizer.save_pretrained(str(folder))
