"""``llmcompile explain --exits``: which layer to exit after.

For every candidate layer ``L`` it measures, on held-out shipped text, how often the exit after
``L`` layers (the model's own final norm + LM head, or a distilled adapter before them) agrees
with the full model's top-1 token, and predicts what self-speculative decoding gains there:

    per verification round, with per-token agreement a and k drafted tokens,
      tokens gained   E = (1 - a^(k+1)) / (1 - a)      (accepted drafts + the verifier's token)
      cost            k * d + 1                          (d: the draft's share of a step)
    speedup = E / (k d + 1),  best k in 1..8

``d`` is the share of a step's weight bytes the draft reads (layers before the exit plus the
LM head): decode is memory-bound, and a verification of k + 1 tokens reads the weights once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ExitRow", "draft_share", "exit_table", "format_table", "speculative_speedup"]


@dataclass
class ExitRow:
    layer: int
    agreement: float
    draft_share: float
    best_k: int
    speedup: float
    distilled: float | None = None


def speculative_speedup(agreement: float, share: float, k: int) -> float:
    """Predicted decode speedup of drafting ``k`` tokens with per-token ``agreement`` and a
    draft costing ``share`` of a step (memory-bound: weight bytes)."""
    a = min(agreement, 1 - 1e-9)
    tokens = (1 - a ** (k + 1)) / (1 - a)
    return tokens / (k * share + 1)


def _layers(model) -> Any:
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    return getattr(inner, "layers", None) or inner.h


def _final_norm(model) -> Any:
    inner = getattr(model, "model", None) or getattr(model, "transformer", None)
    return getattr(inner, "norm", None) or inner.ln_f


def draft_share(model, layer: int) -> float:
    """Weight bytes read by a draft exiting after ``layer`` layers over a full step's."""
    def nbytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())
    per_layer = [nbytes(m) for m in _layers(model)]
    head = nbytes(model.get_output_embeddings())
    return (sum(per_layer[:layer]) + head) / (sum(per_layer) + head)


def exit_logits(model, hidden: torch.Tensor, adapter=None) -> torch.Tensor:
    """The exit head on ``hidden``: [adapter] -> the model's final norm -> LM head."""
    if adapter is not None:
        down, up = adapter
        hidden = hidden + (hidden @ down) @ up
    return model.get_output_embeddings()(_final_norm(model)(hidden))


@torch.no_grad()
def agreement(model, tokens: torch.Tensor, layers: list[int], chunk: int = 256,
              adapters: dict[int, Any] | None = None) -> dict[int, float]:
    """Per layer: the fraction of positions where the exit's top-1 equals the full model's."""
    hits = dict.fromkeys(layers, 0)
    total = 0
    for start in range(0, tokens.numel() - 1, chunk):
        ids = tokens[start:start + chunk][None]
        out = model(ids, output_hidden_states=True, use_cache=False)
        final = out.logits[0].argmax(-1)
        for layer in layers:
            adapter = (adapters or {}).get(layer)
            got = exit_logits(model, out.hidden_states[layer][0], adapter).argmax(-1)
            hits[layer] += int((got == final).sum())
        total += final.numel()
    return {layer: hits[layer] / total for layer in layers}


def exit_table(model, tokens: torch.Tensor, layers: list[int] | None = None,
               adapters: dict[int, Any] | None = None) -> list[ExitRow]:
    """One row per candidate layer (default: every layer but the last)."""
    count = len(_layers(model))
    layers = layers or list(range(1, count))
    shared = agreement(model, tokens, layers)
    distilled = agreement(model, tokens, sorted(adapters), adapters=adapters) if adapters else {}
    rows = []
    for layer in layers:
        share = draft_share(model, layer)
        best = max(distilled.get(layer, 0.0), shared[layer])
        k = max(range(1, 9), key=lambda k: speculative_speedup(best, share, k))
        rows.append(ExitRow(layer, shared[layer], share, k,
                            speculative_speedup(best, share, k), distilled.get(layer)))
    return rows


def format_table(rows: list[ExitRow]) -> str:
    distilled = any(r.distilled is not None for r in rows)
    head = "| exit after | top-1 agreement (shared head) |"
    head += " distilled head |" if distilled else ""
    head += " draft share of step | best k | predicted speedup |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r.layer} | {r.agreement:.1%} |"
        if distilled:
            line += f" {r.distilled:.1%} |" if r.distilled is not None else " |"
        line += f" {r.draft_share:.0%} | {r.best_k} | {r.speedup:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def held_out_tokens(tokenizer, n: int = 1024) -> torch.Tensor:
    """The first ``n`` tokens of the shipped held-out text (Emma; not the calibration text)."""
    import importlib.resources

    text = (importlib.resources.files("llmcompile") / "data" / "eval_emma.txt").read_text()
    return tokenizer(text, return_tensors="pt").input_ids[0][:n]


def explain_exits(spec: Any, layers: list[int] | None = None, distilled: bool = False,
                  tokens: int = 1024) -> str:
    """``llmcompile explain MODEL --exits``: the table for a model spec (``smollm2``, a
    folder...); ``distilled`` also trains (or loads) an adapter per layer."""
    from .. import _compat
    from ..quant.calibrate import load_tokenizer
    from .explain import load_model
    from .models import load_smollm2

    if str(spec).lower() in ("smollm2", "smollm2-135m"):
        model, tokenizer = load_smollm2()
    else:
        model = load_model(spec)
        path = _compat.tokenizer_path(model)
        if path is None:
            raise ValueError(f"{spec!r} has no tokenizer: the exit table reads real text")
        tokenizer = load_tokenizer(path)
    ids = held_out_tokens(tokenizer, tokens)
    adapters = None
    count = len(_layers(model))
    layers = layers or list(range(1, count))
    if distilled:
        from ..deploy.exit_heads import adapter_files, load_adapter
        from ..registry import resolve_recipe

        recipe = resolve_recipe({"passes": [{"name": "early_exit", "layers": layers,
                                             "head": "distilled"}]})
        files = adapter_files(model, recipe.passes[0], tokenizer)
        adapters = {layer: load_adapter(path) for layer, path in files.items()}
    rows = exit_table(model, ids, layers, adapters)
    return (f"exits of {spec} on {ids.numel()} held-out tokens (memory-bound prediction; "
            "measure with llmcompile.generate):\n" + format_table(rows))


@torch.no_grad()
def confident_perplexity(model, tokens: torch.Tensor, recipe: Any, prefix: int = 64,
                         tokenizer: Any = None):
    """Teacher-forced perplexity of ``tokens`` (1-d) under confident exit: after a prefill of
    ``prefix`` tokens, each position is run one token at a time through the recipe's exits
    (later layers' K/V filled from the exit) or the full model, and scored with the
    distribution it stopped at. Returns ``(perplexity, GenerationStats)``."""
    import math

    from ..deploy.generate import GenerationStats
    from .generate import prepare

    run = prepare(model, recipe, tokenizer)
    if run.exit is None or run.exit.mode != "confident":
        raise ValueError("confident_perplexity needs an early_exit pass with mode = "
                         "'confident'")
    stats = GenerationStats(mode="confident", num_layers=run.num_layers)
    run.reserve(tokens.numel() + 2)
    run.generate(tokens[None, :prefix], 1)  # the prefill: fills the cache up to prefix
    targets = tokens[prefix + 1:]
    nll = 0.0
    for i, position in enumerate(range(prefix, prefix + targets.numel())):
        _, logp = run.confident_step(int(tokens[position]), position, stats)
        nll -= float(logp[targets[i]])
    stats.new_tokens = targets.numel()
    return math.exp(nll / targets.numel()), stats
