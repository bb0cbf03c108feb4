"""Calibration: activation statistics of chosen linear layers, from the model on fixed windows.

The model's own eager forward runs on ``samples`` windows of ``seq_len`` tokens of calibration
text (``[1, seq_len]`` each, no KV cache), whatever the call being compiled looks like: a
1-token prompt, a decode step and a 4k prefill all quantize the same weights the same way, and
two processes give byte-identical results. Forward pre-hooks on the layers' modules reduce
their inputs as they come (:class:`_Running`: ``Σ|x|``, ``XᵀX``, a bounded sample of rows), so
nothing of the activations outlives its window; layers are calibrated in groups whose ``XᵀX``
fit :data:`BUDGET_BYTES`, each group's statistics handed to the caller (who solves and drops
them) before the next group starts. A forward stops early once every layer of the group has
seen its window.

The model is found from the program (:func:`model_for`): one registered by llmcompile's own
entry points (:func:`register_model`), or the module Dynamo is compiling.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import _compat
from ..core.program import tensor_key

__all__ = ["ActivationStats", "CalibrationError", "calibration_tokens", "collect_stats",
           "default_text", "load_tokenizer", "model_for", "register_model"]

log = logging.getLogger("llmcompile")

#: ``XᵀX`` bytes held at once (``LLMCOMPILE_CALIBRATION_MB``): more layers than fit are
#: calibrated in several passes over the text (each stops at its last layer)
BUDGET_BYTES = int(os.environ.get("LLMCOMPILE_CALIBRATION_MB", "1024")) * 2**20


class CalibrationError(ValueError):
    """Calibration cannot run: no tokenizer, too little text, or no model to run."""


@dataclass
class ActivationStats:
    absmean: torch.Tensor  # [K] mean |x| per input channel over all calibration tokens
    sample: torch.Tensor  # [R, K] a subsample of input rows (R bounded)
    xtx: torch.Tensor  # [K, K] sum of x^T x over all calibration tokens (GPTQ's Hessian)


def default_text() -> str:
    """The calibration text shipped with the package (Pride and Prejudice, public domain)."""
    return (importlib.resources.files("llmcompile") / "data" / "calibration.txt").read_text()


def load_tokenizer(path: str | Path) -> Any:
    """A transformers tokenizer from a folder (GGUF files included)."""
    from transformers import AutoTokenizer

    folder = Path(path)
    ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    kwargs = {"gguf_file": ggufs[0].name} if ggufs else {}
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def calibration_tokens(tokenizer: Any, text: str | Path | None, n_tokens: int) -> torch.Tensor:
    """``n_tokens`` token ids of the calibration text (a 1-d tensor)."""
    if tokenizer is None:
        raise CalibrationError(
            "calibrated quantization needs a tokenizer for its calibration text: use "
            "llmcompile.compile(model, recipe, tokenizer=tok) or "
            "options={'recipe': ..., 'tokenizer': tok or its path}; or choose method='rtn'")
    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    if text is None or text == "":
        body = default_text()
    elif Path(str(text)).is_file():
        body = Path(str(text)).read_text()
    else:
        raise CalibrationError(f"calibration text file {str(text)!r} does not exist")
    ids = tokenizer(body, return_tensors="pt").input_ids[0]
    if ids.numel() < n_tokens:
        raise CalibrationError(f"calibration text has {ids.numel()} tokens, {n_tokens} needed "
                               "(samples x seq_len): give a longer text or fewer samples")
    return ids[:n_tokens]


# --- which model ---------------------------------------------------------------------------

_registered: weakref.WeakSet = weakref.WeakSet()


def register_model(model: Any) -> None:
    """Make ``model`` (a module or its bound forward) findable by calibration from the graphs
    compiled of it (llmcompile's entry points call this; ``torch.compile`` needs nothing)."""
    owner = getattr(model, "__self__", model)
    if isinstance(owner, torch.nn.Module):
        _registered.add(owner)


def _owns(module: Any, program) -> bool:
    """True when the program's weights are ``module``'s parameters and buffers at their paths
    (the same memory); sources the module does not have (constants ``torch.export`` lifted)
    are not counted."""
    if not isinstance(module, torch.nn.Module):
        return False
    tensors = dict(module.named_parameters(remove_duplicate=False))
    tensors.update(module.named_buffers(remove_duplicate=False))
    checked = 0
    for name, path in program.sources.items():
        weight, own = program.weights.get(name), tensors.get(path)
        if weight is None:
            continue
        if own is None:
            continue
        if tensor_key(own) != tensor_key(weight):
            return False
        checked += 1
    return checked > 0


def model_for(program) -> torch.nn.Module | None:
    """The module whose weights the program's are: the context's ``model``, one registered,
    or the object Dynamo reached the weights through."""
    candidates = [program.context.get("model"), *list(_registered),
                  *_compat.dynamo_frame_objects(program.roots)]
    for candidate in candidates:
        candidate = getattr(candidate, "__self__", candidate)  # a bound forward
        if candidate is not None and _owns(candidate, program):
            return candidate
    return None


# --- statistics ----------------------------------------------------------------------------

class _Running:
    """Statistics of one layer's input, reduced as windows come."""

    def __init__(self, k: int, rows_per_window: int):
        self.abs_sum = torch.zeros(k)
        self.xtx = torch.zeros(k, k)
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.rows_per_window = rows_per_window

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])  # [T, K]
        self.abs_sum += x.abs().sum(0)
        self.xtx.addmm_(x.T, x)
        self.count += x.shape[0]
        take = torch.randperm(x.shape[0], generator=generator)[: self.rows_per_window]
        self.rows.append(x[take].clone())  # a copy: no view keeps the window alive

    def result(self) -> ActivationStats:
        return ActivationStats(self.abs_sum / max(1, self.count), torch.cat(self.rows),
                               self.xtx)


class _GroupDone(Exception):
    """Every layer of the group has seen this window: the rest of the forward is not needed."""


def _groups(model: torch.nn.Module, paths: Sequence[str]) -> list[list[str]]:
    """``paths`` in the model's module order, cut where their ``XᵀX`` exceed the budget."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups: list[list[str]] = [[]]
    used = 0
    for path in sorted(paths, key=lambda p: order[p]):
        k = model.get_submodule(path).weight.shape[1]
        if groups[-1] and used + 4 * k * k > BUDGET_BYTES:
            groups.append([])
            used = 0
        groups[-1].append(path)
        used += 4 * k * k
    return groups


def _check_paths(model: torch.nn.Module, paths: Sequence[str]) -> None:
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise CalibrationError(f"no module {path!r} in the model to calibrate") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CalibrationError(f"module {path!r} has no 2-d weight to calibrate for")


def collect_stats(model: torch.nn.Module, paths: Sequence[str], tokens: torch.Tensor,
                  seq_len: int, *, rows: int = 512, seed: int = 0, progress: bool = True
                  ) -> Iterator[dict[str, ActivationStats]]:
    """Statistics of the input of each module in ``paths`` (linear layers: ``weight`` [N, K]),
    over ``tokens`` cut in windows of ``seq_len``; yields them a group of layers at a time."""
    _check_paths(model, paths)
    windows = tokens[: tokens.numel() // seq_len * seq_len].view(-1, seq_len)
    if not len(windows):
        raise CalibrationError(f"calibration text shorter than one window of {seq_len} tokens")
    groups = _groups(model, paths)
    for i, group in enumerate(groups):
        desc = "llmcompile: calibrating" + (f" ({i + 1}/{len(groups)})" if len(groups) > 1
                                            else "")
        yield _run_group(model, group, windows, max(1, rows // len(windows)), seed,
                         desc if progress else None)


def _run_group(model: torch.nn.Module, group: list[str], windows: torch.Tensor,
               rows_per_window: int, seed: int, desc: str | None
               ) -> dict[str, ActivationStats]:
    running = {p: _Running(model.get_submodule(p).weight.shape[1], rows_per_window)
               for p in group}
    generator = torch.Generator().manual_seed(seed)
    seen: set[str] = set()

    def hook(path):
        def record(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            running[path].add(x, generator)
            seen.add(path)
            if len(seen) == len(running):
                raise _GroupDone
        return record

    device = next(model.parameters()).device
    handles = [model.get_submodule(p).register_forward_pre_hook(hook(p), with_kwargs=True)
               for p in group]
    try:
        with torch.no_grad():
            for window in tqdm(windows, desc=desc, disable=desc is None):
                seen.clear()
                with contextlib.suppress(_GroupDone):
                    model(input_ids=window[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [p for p, r in running.items() if r.count == 0]
    if missing:
        raise CalibrationError(f"layers {missing[:4]} never ran in the model's forward")
    return {p: r.result() for p, r in running.items()}
