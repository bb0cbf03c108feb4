"""Calibration: activation statistics of chosen nodes, from the captured graph itself.

The graph is run (eagerly, on the real weights) on windows of calibration text that replace its
token-id input; every other input is taken from the call being compiled, and inputs the graph
writes in place (KV caches) are cloned first, so calibrating never touches the user's state.
Windows have the length of the call being compiled, so every symbolic size stays consistent.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from tqdm import tqdm

from ..core.program import Program, mutated_inputs

__all__ = ["ActivationStats", "CalibrationError", "calibration_tokens", "collect_inputs",
           "default_text"]

MIN_WINDOW = 16


class CalibrationError(ValueError):
    """Calibration cannot run: no tokenizer, too little text, or no token input in the graph."""


@dataclass
class ActivationStats:
    absmean: torch.Tensor  # [K] mean |x| per input channel over all calibration tokens
    sample: torch.Tensor  # [R, K] a subsample of input rows
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


def _token_input(program: Program) -> fx.Node:
    for node in program.graph.nodes:
        if node.op != "placeholder" or node.name in program.weights:
            continue
        for user in node.users:
            if user.target is torch.ops.aten.embedding.default and user.args[1] is node:
                return node
    raise CalibrationError("no token-id input feeding an embedding was found in this graph; "
                           "calibration needs a language-model forward")


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node], rows: int, seed: int):
        super().__init__(gm)
        self.watch, self.rows = {n.name for n in watch}, rows
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.xtx: dict[str, torch.Tensor] = {}
        self.generator = torch.Generator().manual_seed(seed)

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.watch:
            x = self.env[n.args[0]].detach().float()
            x = x.reshape(-1, x.shape[-1])
            self.sums[n.name] = self.sums.get(n.name, 0) + x.abs().sum(0)
            self.counts[n.name] = self.counts.get(n.name, 0) + x.shape[0]
            self.xtx[n.name] = self.xtx.get(n.name, 0) + x.T @ x
            take = torch.randperm(x.shape[0], generator=self.generator)[: max(1, self.rows // 8)]
            self.samples.setdefault(n.name, []).append(x[take])
        return super().run_node(n)


def collect_inputs(program: Program, nodes: Sequence[fx.Node], tokens: torch.Tensor, *,
                   rows: int = 512, seed: int = 0, progress: bool = True
                   ) -> dict[str, ActivationStats]:
    """Statistics of the first argument of each node in ``nodes`` (keyed by node name)."""
    token_node = _token_input(program)
    placeholders = [n for n in program.graph.nodes if n.op == "placeholder"]
    example = program.example_inputs
    if example is None or len(example) != len(placeholders):
        raise CalibrationError("this graph has no example inputs to calibrate with")
    index = placeholders.index(token_node)
    shape = tuple(example[index].shape)  # [B, L]
    window = int(torch.tensor(shape).prod())
    if shape[-1] < MIN_WINDOW:
        raise CalibrationError(f"the first compiled call has {shape[-1]} tokens; calibration "
                               f"needs a prefill of at least {MIN_WINDOW} (compile a prefill "
                               "first, later graphs reuse its statistics)")
    mutated = {placeholders.index(n) for n in mutated_inputs(program.graph)}
    recorder = _Recorder(program.gm, set(nodes), rows, seed)
    windows = list(tokens[: tokens.numel() // window * window].view(-1, *shape))
    if not windows:
        raise CalibrationError(f"calibration text shorter than one window of {window} tokens")
    with torch.no_grad():
        for ids in tqdm(windows, desc="llmcompile: calibrating", disable=not progress):
            args = [ids.to(example[i].device) if i == index else
                    (example[i].clone() if i in mutated else example[i])
                    for i in range(len(example))]
            recorder.run(*args)
    stats = {}
    for name, total in recorder.sums.items():
        sample = torch.cat(recorder.samples[name])[:rows]
        stats[name] = ActivationStats(total / recorder.counts[name], sample, recorder.xtx[name])
    return stats
