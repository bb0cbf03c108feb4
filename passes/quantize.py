"""Weight-only quantization of linear layers (lossy: never in the default recipe).

    linear(x, W, b)  ==>  llmcompile.int8_linear(x, q8(W), s, b)                     bits = 8
    linear(x, W, b)  ==>  llmcompile.int4_linear(x / a, q4(W · a), scales_zeros, G, b)  bits = 4
    linear(x, W, b)  ==>  llmcompile.matmul_nbits(x [/ a], qW, scales, zeros, K, bits, G, b)
                                                          target "onnxruntime" (MatMulNBits)

``W`` must be a model weight (or a folded one, e.g. a fused Q/K/V weight); it is quantized and
packed once, at compile time. ``a`` are AWQ scales (``method = "awq"``, searched on calibration
text) or ones (``"rtn"``, round-to-nearest). ``skip`` lists module-path globs kept in float;
``only`` limits the pass to the layers its globs match, so a recipe can give one layer (the LM
head, say) its own bits and method with a second ``quantize_weights`` entry.
For the ``onnxruntime`` target the weights are laid out for ONNX Runtime's ``MatMulNBits``
(int4 with integer zero points; int8 per channel as 8-bit blocks of 32) and
``accuracy_level`` tells it which compute it may use (4: int8 activations, fastest on CPU;
0: the activations' own dtype). There, an embedding table tied to a quantized linear layer
(the LM head) is read from the same quantized bytes:

    embedding(W, ids)  ==>  llmcompile.gather_nbits(qW, ids, scales, zeros, K, bits, G) [· 1/a]

(``GatherBlockQuantized`` in ONNX Runtime: the file holds the table once, in 4 or 8 bits).
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from llmcompile import ops, quant
from llmcompile.core import stages
from llmcompile.core.program import tensor_key
from llmcompile.core.recipe import PassConfig, RecipeError
from llmcompile.core.rewrite import apply_rules
from llmcompile.core.rules import Match, Reject, Rule, RuleSet
from llmcompile.ops import cpu
from llmcompile.quant import calibrate, store
from llmcompile.quant.calibrate import CalibrationError, calibration_tokens, collect_stats

GROUP_SIZES = (32, 64, 128)
_LAYOUT = ("kernel_nibbles", "kernel_scale", "kernel_low")  # int4 decode kernel, stored
CALIBRATION_KEYS = {"samples": 16, "seq_len": 256, "text": ""}
#: solved layers by artifact key (:mod:`llmcompile.quant.store`): the graphs of one model
#: (prefill, decode step...) share one copy in a process; files serve the next process
_CACHE: dict[str, dict[str, Any]] = {}


def linear(x, w):
    return F.linear(x, w)


def linear_bias(x, w, b):
    return F.linear(x, w, b)


def embedding(w, ids):
    return torch.ops.aten.embedding.default(w, ids)


def embedding_padded(w, ids, padding_idx: int):  # padding_idx only matters for training
    return torch.ops.aten.embedding.default(w, ids, padding_idx)


def gather_replacement(ids, qweight, scales, k: int, bits: int, block_size: int,
                       zero_points=None, inv_scale=None):
    rows = ops.gather_nbits(qweight, ids, scales, zero_points, k, bits, block_size)
    return rows if inv_scale is None else rows * inv_scale


def int8_replacement(x, wq, scales, b=None):
    return ops.int8_linear(x, wq, scales, b)


def int4_replacement(x, packed, scales_zeros, group_size: int, inv_scale=None, b=None):
    return ops.int4_linear(x if inv_scale is None else x * inv_scale, packed, scales_zeros,
                           group_size, b)


def nbits_replacement(x, qweight, scales, k: int, bits: int, block_size: int,
                      accuracy_level: int, zero_points=None, inv_scale=None, b=None):
    return ops.matmul_nbits(x if inv_scale is None else x * inv_scale, qweight, scales,
                            zero_points, k, bits, block_size, accuracy_level, b)


@dataclass(frozen=True)
class QuantizeConfig(PassConfig):
    """int8 per-channel symmetric or int4 grouped asymmetric weight-only quantization."""

    name: ClassVar[str] = "quantize_weights"
    phase: ClassVar[str] = "quantize"
    lossy: ClassVar[bool] = True
    bits: Literal[8, 4] = 8
    group_size: int = 64
    method: Literal["rtn", "awq", "gptq", "awq+gptq"] = "rtn"
    skip: tuple[str, ...] = ()
    only: tuple[str, ...] = ()
    calibration: dict = field(default_factory=dict)
    seed: int = 0
    accuracy_level: int = 4

    def validate(self) -> None:
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise RecipeError(f"quantize_weights.accuracy_level: {self.accuracy_level!r} is not "
                              "valid; choose 0 (activation dtype), 1 (fp32), 2 (fp16), "
                              "3 (bf16) or 4 (int8)")
        if self.bits == 4 and self.group_size not in GROUP_SIZES:
            raise RecipeError(f"quantize_weights.group_size: {self.group_size} is not valid; "
                              f"choose one of {', '.join(map(str, GROUP_SIZES))}")
        if self.method != "rtn" and self.bits != 4:
            raise RecipeError(f"quantize_weights.method: {self.method!r} applies to bits = 4; "
                              "int8 per-channel uses 'rtn'")
        unknown = set(self.calibration) - set(CALIBRATION_KEYS)
        if unknown:
            raise RecipeError(f"quantize_weights.calibration: unknown keys {sorted(unknown)}; "
                              f"valid: {', '.join(CALIBRATION_KEYS)}")
        for key in ("samples", "seq_len"):
            value = self.calibration.get(key, CALIBRATION_KEYS[key])
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise RecipeError(f"quantize_weights.calibration.{key}: expected a positive "
                                  f"integer, got {value!r}")

    def run(self, program, stats) -> None:
        targets = _eligible(program)
        paths = {n.name: program.module_path(n) for n in targets}
        for key in ("skip", "only"):
            for glob in getattr(self, key):
                if not any(fnmatch.fnmatchcase(p, glob) for p in paths.values()):
                    raise RecipeError(f"quantize_weights.{key}: {glob!r} matches no linear "
                                      "layer left in float; layers look like "
                                      f"{sorted(set(paths.values()))[:6]}")

        def selected(node) -> bool:
            path = paths[node.name]
            return (not any(fnmatch.fnmatchcase(path, g) for g in self.skip)
                    and (not self.only or any(fnmatch.fnmatchcase(path, g) for g in self.only)))

        keep = [n for n in targets if selected(n)]
        for node in keep:
            k = program.weight(node.args[1]).shape[1]
            if self.bits == 4 and k % self.group_size:
                valid = [g for g in GROUP_SIZES if k % g == 0]
                raise RecipeError(f"quantize_weights.group_size: {self.group_size} does not "
                                  f"divide the input width {k} of {paths[node.name]}; valid "
                                  f"for this model: {valid or 'none (skip this layer)'}")
        onnx = program.context.get("target") == "onnxruntime"
        keys = self._keys(program, keep, paths, onnx)  # node name -> artifact key
        todo = [n for n in keep if _known(keys[n.name]) is None]
        if todo and self.method != "rtn":
            self._calibrate_and_solve(program, todo, keys, paths, onnx)
        rules = self._rules(keys, onnx)
        if onnx:
            rules = RuleSet(rules.name, [*rules.rules, *self._tied_rules(program, keep, keys)])
        apply_rules(program, rules, stats)

    # --- what determines a layer's quantized tensors ---------------------------------------

    def _keys(self, program, nodes, paths: dict[str, str], onnx: bool) -> dict[str, str]:
        """A layer's artifact key: its weight's bytes, this config, the code, torch and the
        packing; for calibrated methods also the whole model and the calibration tokens."""
        common = [self.bits, self.group_size, self.method, self.seed,
                  sorted({**CALIBRATION_KEYS, **self.calibration}.items()), onnx,
                  str(cpu.packed_activation_dtype()), cpu.capability(), torch.__version__,
                  _code_version()]
        if self.method != "rtn" and nodes:
            model, tokens = self._calibration_inputs(program)
            common += [_model_digest(model), store.digest(tokens)]
        return {n.name: store.artifact_key([store.digest(program.weight(n.args[1])),
                                            paths[n.name], *common]) for n in nodes}

    def _calibration_inputs(self, program) -> tuple[torch.nn.Module, torch.Tensor]:
        """(the model to run, the calibration token ids): fixed by the recipe and the model,
        never by the call being compiled."""
        cal = {**CALIBRATION_KEYS, **self.calibration}
        # one per calibration setting: two entries of a recipe may calibrate on other text
        cached = program.context.setdefault("calibration_inputs", {})
        key = (str(cal["text"]), cal["samples"] * cal["seq_len"])
        if key not in cached:
            model = calibrate.model_for(program)
            if model is None:
                raise RecipeError(
                    f"quantize_weights.method = {self.method!r} calibrates by running the model, "
                    "and this graph's weights belong to no module llmcompile can find: compile "
                    "through llmcompile.compile(model, ...) or llmcompile.generate, or "
                    "torch.compile the model (or its forward) itself; or choose method='rtn'")
            try:
                tokens = calibration_tokens(program.context.get("tokenizer"), cal["text"],
                                            cal["samples"] * cal["seq_len"])
            except CalibrationError as e:
                raise RecipeError(str(e)) from None
            cached[key] = (model, tokens)
        return cached[key]

    def _calibrate_and_solve(self, program, nodes, keys: dict[str, str],
                             paths: dict[str, str], onnx: bool) -> None:
        """Run the model on the calibration windows a group of layers at a time; solve each
        group's layers and drop its statistics before the next group."""
        cal = {**CALIBRATION_KEYS, **self.calibration}
        model, tokens = self._calibration_inputs(program)
        by_path: dict[str, list] = {}
        for n in nodes:
            by_path.setdefault(_stats_module(model, paths[n.name]), []).append(n)
        for path, found in by_path.items():
            k = program.weight(found[0].args[1]).shape[1]
            if path is None or model.get_submodule(path).weight.shape[1] != k:
                raise RecipeError(f"quantize_weights: no module of the model reads the input "
                                  f"of {paths[found[0].name]!r} (width {k}) to calibrate it")
        groups = collect_stats(model, list(by_path), tokens, cal["seq_len"], seed=self.seed)
        while True:
            with program.timed("calibration"):
                found = next(groups, None)
            if found is None:
                break
            for path, act in found.items():
                for n in by_path[path]:
                    with program.timed("solve"):
                        self._solved(keys[n.name], paths[n.name],
                                     program.weight(n.args[1]), act, onnx)
            del found

    def _rules(self, keys: dict[str, str], onnx: bool) -> RuleSet:
        def check(m: Match) -> Reject | dict:
            if m.anchor.name not in keys:
                return Reject("not selected (skipped, not a 2-d float weight, or no weight)")
            if not onnx and not cpu.packed_kernels_pay():
                return Reject(f"ATen has no vector kernels for packed weights on this CPU "
                              f"({cpu.capability()}): a dense float matmul is faster")
            if self.bits == 4 and m.shape("w")[0] % 16 and not onnx:
                return Reject(f"output width {m.shape('w')[0]} is not a multiple of 16, which "
                              "the int4 CPU kernel needs")
            return dict(self._solved(keys[m.anchor.name], m.program.module_path(m.anchor),
                                     m.weight("w"), None, onnx))

        replacement = (nbits_replacement if onnx else int8_replacement if self.bits == 8
                       else int4_replacement)
        name = f"int{self.bits}_linear" + ("_nbits" if onnx else "")
        return RuleSet(name, [
            Rule(name, linear, _without_bias(replacement), check=check,
                 example={"x": (2, 8), "w": (4, 8)}),
            Rule(f"{name}_bias", linear_bias, replacement, check=check,
                 example={"x": (2, 8), "w": (4, 8), "b": (4,)}),
        ])

    def _tied_rules(self, program, keep, keys: dict[str, str]) -> list:
        """Embeddings whose table is a selected linear layer's weight (tied): read from the
        same ``MatMulNBits`` tensors through ``gather_nbits``."""
        # the selected layers' weights, keyed before they are rewritten (first layer per tensor)
        linear_of: dict[tuple, str] = {}
        for n in keep:
            linear_of.setdefault(tensor_key(program.weight(n.args[1])), n.name)

        def check(m: Match) -> Reject | dict:
            if not m.program.is_weight(m["w"]):
                return Reject("the table is not a model weight")
            table = m.weight("w")
            tied = linear_of.get(tensor_key(table))
            if tied is None:
                return Reject("not tied to a linear layer this pass quantizes (an untied "
                              "table is only gathered from: it stays in float)")
            packed = dict(self._solved(keys[tied], tied, table, None, True))
            if packed["qweight"].shape[1] * packed["block_size"] != packed["k"]:
                return Reject(f"width {packed['k']} is not a whole number of "
                              f"{packed['block_size']}-wide blocks")
            packed.pop("accuracy_level")
            return packed

        name = f"int{self.bits}_embedding_tied"
        example = {"w": (16, 8), "ids": torch.zeros(2, 3, dtype=torch.long)}
        return [Rule(name, embedding, gather_replacement, check=check, example=example),
                Rule(f"{name}_padded", embedding_padded, gather_replacement, check=check,
                     example=example)]

    def _solved(self, key: str, layer: str, w: torch.Tensor, act, onnx: bool
                ) -> dict[str, Any]:
        """The layer's quantized tensors: from this process, from the artifact store, or
        solved now (and stored). A calibrated layer is solved with its statistics ``act``."""
        found = _known(key)
        if found is None:
            if act is None and self.method != "rtn":
                raise RuntimeError(f"{layer}: calibrated layer reached unsolved")  # a bug
            found = self._quantize(w, act, onnx)
            stages.count("quant layers solved")
            store.save(key, found, {"layer": layer, "config": _describe(self)})
            # read back: the tensors a later process loads (same strides, so torch's compile
            # caches see the same graph; memory-mapped, not a second copy)
            found = store.load(key) or found
            _CACHE[key] = found = _register_layout(found)
        return found

    def _quantize(self, w: torch.Tensor, act, onnx: bool) -> dict[str, Any]:
        if w.device.type != "cpu" and not onnx:
            raise RecipeError(f"quantize_weights: packed {self.bits}-bit kernels are wired for "
                              f"CPU only in this version (weight on {w.device})")
        nbits = {"k": w.shape[1], "bits": self.bits, "accuracy_level": self.accuracy_level}
        w = w.detach().cpu()  # packed on the host: they become ONNX initializers or CPU packs
        if self.bits == 8:
            q, s = quant.quantize_int8(w.float())
            if onnx:
                qweight, scales = quant.int8_nbits(q, s, w.dtype)
                return {"qweight": qweight, "scales": scales,
                        "block_size": quant.NBITS_INT8_BLOCK, **nbits}
            return {"wq": q, "scales": s.to(cpu.packed_activation_dtype())}
        scales, clip = None, 1.0
        if act is not None and "awq" in self.method:
            scales, clip = quant.awq_search(w, act.absmean, act.sample, self.group_size)
        if act is not None and "gptq" in self.method:
            wq = quant.gptq_int4(w, act.xtx, self.group_size, scales=scales, integer_zero=onnx)
        else:
            wq = quant.quantize_int4(w.float() * scales if scales is not None else w.float(),
                                     self.group_size, clip, integer_zero=onnx)
        if onnx:
            qweight, scales_, zeros = quant.int4_nbits(wq, w.dtype)
            out = {"qweight": qweight, "scales": scales_, "zero_points": zeros,
                   "block_size": self.group_size, **nbits}
        else:
            packed, sz = wq.pack_cpu(cpu.packed_activation_dtype())
            out = {"packed": packed, "scales_zeros": sz, "group_size": self.group_size}
            if self.group_size % 64 == 0:  # the decode kernel's layout, stored beside
                out.update(zip(_LAYOUT, cpu.int4_kernel_layout(wq.q, sz, self.group_size)))
        if scales is not None:
            out["inv_scale"] = (1.0 / scales).to(w.dtype)
        return out


def _without_bias(replacement):
    """The replacement for the bias-free pattern: same parameters, minus ``b``."""
    def no_bias(x, **kwargs):
        return replacement(x, **kwargs)

    sig = inspect.signature(replacement)
    no_bias.__signature__ = sig.replace(
        parameters=[p for n, p in sig.parameters.items() if n != "b"])
    return no_bias


def _eligible(program) -> list:
    out = []
    for node in program.graph.nodes:
        if node.target is not torch.ops.aten.linear.default or len(node.args) < 2:
            continue
        w = node.args[1]
        tensor = program.weight(w) if program.is_weight(w) else None
        if tensor is not None and tensor.dim() == 2 and tensor.is_floating_point():
            out.append(node)
    return out


def _known(key: str) -> dict[str, Any] | None:
    """A solved layer already in this process or in the artifact store (its replacement's
    arguments; a stored int4 decode-kernel layout is registered for the lowering)."""
    if key not in _CACHE:
        found = store.load(key)
        if found is None:
            return None
        stages.count("quant layers loaded")
        _CACHE[key] = _register_layout(found)
    return _CACHE[key]


def _register_layout(found: dict[str, Any]) -> dict[str, Any]:
    """Hand the int4 decode kernel's stored layout to the lowering (keyed by the ATen pack it
    belongs to: no unpacking at compile time); the rest are the replacement's arguments."""
    layout = [found.pop(name, None) for name in _LAYOUT]
    if all(t is not None for t in layout) and "packed" in found:
        cpu.INT4_LAYOUTS[found["packed"]] = tuple(layout)
    return found


def _describe(config: QuantizeConfig) -> str:
    return f"int{config.bits} g{config.group_size} {config.method}"


@functools.cache
def _code_version() -> str:
    """A hash of the code that computes and packs the artifacts."""
    files = [__file__, inspect.getsourcefile(quant.formats), inspect.getsourcefile(calibrate)]
    return store.artifact_key(Path(f).read_text() for f in files)


def _model_digest(model: torch.nn.Module) -> str:
    """What every calibrated layer depends on: all the model's weights (activations flow
    through them)."""
    return store.artifact_key(f"{name}:{store.digest(t)}"
                              for name, t in model.state_dict(keep_vars=True).items())


def _stats_module(model: torch.nn.Module, path: str) -> str | None:
    """The module whose input the layer at ``path`` reads: ``path`` itself, or for a fused
    projection (traced inside one of its parts) the first 2-d-weight module at or under it."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    for name, sub in module.named_modules(prefix=path):
        weight = getattr(sub, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return name
    return None
