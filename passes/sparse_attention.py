"""Dense causal attention becomes sparse: a sliding window with attention sinks, or blocks.

    attention(q, k, v, None, c, causal=True, window=w0)
        ==>  attention(q, k, v, None, c, causal=True, window=W, sinks=N)       sliding_window
    attention(q, k, v, mask, c)        mask built from sizes alone and causal (window w0)
        ==>  attention(q, k, v, None, c, causal=True, window=W, sinks=N)
    ... ==>  attention(q, k, v, None, c, causal=True, block=B, local_blocks=L,
                       vertical_stride=V)                                      block_sparse

(lossy: never in the default recipe). ``W = min(window, w0)`` when the model already has a
window ``w0`` (Mistral / Gemma-2 sliding layers keep the smaller one, without sinks when theirs
is smaller). Only the layers named by ``layers`` change (from the graph's module stack). A
mask that reads tensor data (padding, a static cache's ``cache_position``) or is not causal is
declined with the reason :func:`llmcompile.analysis.masks.causal_window` gives; so is a layer
whose keys never outnumber the window (nothing to skip). The pass reports the prefill length
from which the window pays (solved with the cost model).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from llmcompile import ops
from llmcompile.analysis import cost
from llmcompile.analysis.masks import causal_window
from llmcompile.core.recipe import PassConfig, RecipeError
from llmcompile.core.rewrite import apply_rules
from llmcompile.core.rules import Match, Reject, Rule, RuleSet

_EXAMPLE = {"q": (1, 2, 6, 8), "k": (1, 2, 6, 8), "v": (1, 2, 6, 8), "mask": (1, 1, 6, 6)}
PATTERNS = ("sliding_window", "block_sparse")


# --- patterns -------------------------------------------------------------------------------

def causal(q, k, v, scale: float, window: int):
    """attention described as causal (export, ``is_causal`` SDPA, our own rewrites)"""
    return ops.attention(q, k, v, None, scale, True, window)


def masked(q, k, v, mask, scale: float):
    """attention with a mask tensor (Hugging Face's causal mask under torch.compile)"""
    return ops.attention(q, k, v, mask, scale)


def sparse(q, k, v, scale: float, window: int = 0, sinks: int = 0, block: int = 0,
           local_blocks: int = 0, vertical_stride: int = 0, mask=None):
    return ops.attention(q, k, v, None, scale, True, window, sinks, block, local_blocks,
                         vertical_stride)


# --- config ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class SparseAttentionConfig(PassConfig):
    """Sliding window + attention sinks (StreamingLLM), or block-sparse (local + strided)."""

    name: ClassVar[str] = "sparse_attention"
    phase: ClassVar[str] = "sparse_attention"
    lossy: ClassVar[bool] = True
    pattern: Literal["sliding_window", "block_sparse"] = "sliding_window"
    window: int = 512
    sink_tokens: int = 4
    #: "all", a list of layer indices, or a glob over the index ("[0-9]", "*[02468]")
    layers: str | tuple[int, ...] = "all"
    block: int = 64
    local_blocks: int = 4
    vertical_stride: int = 8

    def validate(self) -> None:
        if self.window < 1:
            raise RecipeError(f"sparse_attention.window: {self.window} is not valid; give the "
                              "number of keys each query sees, at least 1")
        if self.sink_tokens < 0:
            raise RecipeError(f"sparse_attention.sink_tokens: {self.sink_tokens} is not valid; "
                              "give 0 or more")
        for name in ("block", "local_blocks", "vertical_stride"):
            if getattr(self, name) < 1:
                raise RecipeError(f"sparse_attention.{name}: {getattr(self, name)} is not "
                                  "valid; give 1 or more")
        if self.pattern == "block_sparse" and self.block & (self.block - 1):
            raise RecipeError(f"sparse_attention.block: {self.block} is not valid; give a "
                              "power of two (16, 32, 64, 128) so that blocks tile the kernel's")
        if isinstance(self.layers, str) and self.layers != "all" and not any(
                c in self.layers for c in "*?["):
            raise RecipeError(f"sparse_attention.layers: {self.layers!r} is not valid; give "
                              "'all', a list of layer indices, or a glob such as '[0-9]'")
        if isinstance(self.layers, tuple) and any(i < 0 for i in self.layers):
            raise RecipeError(f"sparse_attention.layers: {list(self.layers)} has a negative "
                              "index; layers count from 0")

    def selects(self, layer: int | None) -> bool:
        if layer is None:
            return False
        if self.layers == "all":
            return True
        if isinstance(self.layers, tuple):
            return layer in self.layers
        return fnmatch.fnmatchcase(str(layer), self.layers)

    def description(self) -> dict[str, int]:
        """The op's mask fields this config sets."""
        if self.pattern == "block_sparse":
            return {"block": self.block, "local_blocks": self.local_blocks,
                    "vertical_stride": self.vertical_stride}
        return {"window": self.window, "sinks": self.sink_tokens}

    def run(self, program, stats) -> None:
        layers = _attention_layers(program)
        if isinstance(self.layers, tuple):
            past = [i for i in self.layers if i not in layers]
            if past:
                raise RecipeError(f"sparse_attention.layers: {past} name no attention layer; "
                                  f"valid: {sorted(layers)}")
        if self.pattern == "sliding_window":
            stats.notes.append(_break_even_note(self.window, self.sink_tokens))
        apply_rules(program, _rules(self), stats)


def _attention_layers(program) -> set[int]:
    target = ops.attention.default
    found = {cost.layer_index(program.module_path(n)) for n in program.graph.nodes
             if n.target is target}
    return {i for i in found if i is not None}


# --- checks ---------------------------------------------------------------------------------

def _model_window(m: Match) -> int | Reject:
    """The window the model already has (0: plain causal), or why the mask is not causal."""
    if "mask" not in m.binds:
        return int(m["window"])
    found = causal_window(m["mask"])
    return Reject(f"the mask is not a causal mask built from sizes: {found}") \
        if isinstance(found, str) else found


def _check(config: SparseAttentionConfig):
    def check(m: Match) -> Reject | dict[str, Any]:
        layer = cost.layer_index(m.module_path)
        if not config.selects(layer):
            return Reject(f"layer {layer} is not selected by layers = {config.layers!r}"
                          if layer is not None else "not inside a numbered decoder layer")
        own = _model_window(m)
        if isinstance(own, Reject):
            return own
        spec = config.description()
        if config.pattern == "sliding_window" and own and own <= config.window:
            if "mask" not in m.binds:
                return Reject(f"the layer already has a window of {own} keys, no wider than "
                              f"{config.window}: kept as it is")
            spec = {"window": own, "sinks": 0}  # the model's own window is the smaller one
        keys = m.shape("k")[2]
        span = spec.get("window", 0) + spec.get("sinks", 0) if config.pattern == \
            "sliding_window" else config.block * config.local_blocks
        if isinstance(keys, int) and keys <= span:
            return Reject(f"the window ({span} keys) covers all {keys} keys: nothing to skip")
        return {"scale": m["scale"], **spec}
    return check


def _rules(config: SparseAttentionConfig) -> RuleSet:
    check = _check(config)
    return RuleSet("sparse_attention", [
        Rule(f"{config.pattern}_causal", causal, sparse, check=check,
             example={n: _EXAMPLE[n] for n in "qkv"}),
        Rule(f"{config.pattern}_masked", masked, sparse, check=check, example=_EXAMPLE),
    ])


def _break_even_note(window: int, sinks: int, block: int = 128) -> str:
    length = cost.window_break_even(window, sinks, block)
    return (f"window {window} + {sinks} sinks: prefill attention does less work than dense "
            f"causal attention from {length} tokens on (break-even from the cost model, "
            f"kernel blocks of {block})")
