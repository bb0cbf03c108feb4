"""Early-exit heads: the first ``L`` decoder layers, then an exit head, cut from the one graph.

    full graph:   embed -> layer 0 .. layer N-1 -> norm -> lm_head
    draft graph:  embed -> layer 0 .. layer L-1 -> [adapter] -> norm -> lm_head
                  (speculative: layers L.. are gone, their KV-cache writes too)
    exit graph:   the same, and every later layer's K/V for this position is computed from the
                  exit hidden state and written to the cache (CALM's KV filling), so a later
                  token that runs the full model sees a consistent cache

The cut is structural: layer boundaries come from the graph's module stack, the hidden state
entering layer ``L`` is the one value layer ``L-1`` hands to layer ``L``, and the final norm is
fed that value instead of the last layer's output. The draft shares every weight with the full
graph (no copy). It runs before fusion, on the canonical graph, where each layer boundary is a
single value; the later phases fuse and quantize the cut graph like any other.

A recipe's ``early_exit`` pass builds the graph named by ``graph``: ``"full"`` (the default,
what ``torch.compile`` returns: the model unchanged, with the exit's cost share in the report)
or ``"draft"``. :func:`llmcompile.generate` compiles both and runs self-speculative decoding
(``mode = "speculative"``: lossless) or confident early exit (``mode = "confident"``: lossy).
``head = "distilled"`` puts a trained low-rank adapter before the shared norm + LM head
(:mod:`llmcompile.deploy.exit_heads` trains and stores it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from llmcompile import _compat
from llmcompile.analysis.cost import layer_index
from llmcompile.core.recipe import PassConfig, RecipeError

__all__ = ["CutError", "EarlyExitConfig", "ExitCut", "cut_at_exit", "find_layers"]

_HEADS = ("shared", "distilled")
_MODES = ("speculative", "confident")


@dataclass(frozen=True)
class EarlyExitConfig(PassConfig):
    """Exit heads after chosen layers; drafts for self-speculative decoding or confident exit."""

    name: ClassVar[str] = "early_exit"
    phase: ClassVar[str] = "early_exit"
    #: exit after this many layers (``[10]``: layers 0..9 run, then the exit head); the first
    #: entry is the draft / first exit, further entries are later confident exits
    layers: tuple[int, ...] = (10,)
    head: Literal["shared", "distilled"] = "shared"
    mode: Literal["speculative", "confident"] = "speculative"
    draft_tokens: int = 4
    #: speculative: stop drafting while the measured acceptance and call times say plain
    #: decoding is faster, and probe again now and then (the output is the same either way)
    adaptive: bool = True
    threshold: float = 0.9
    #: rank of the distilled adapter (``head = "distilled"``)
    rank: int = 64
    #: the adapter file (``head = "distilled"``; ``{layer}`` is replaced by the exit); empty:
    #: llmcompile.generate keeps it in the cache folder, keyed by the model
    adapter: str = ""
    #: which graph this compile builds: "full" (the model; what torch.compile gets) or
    #: "draft" (the first layers + exit head; llmcompile.generate builds both)
    graph: Literal["full", "draft"] = "full"

    def validate(self) -> None:
        if not self.layers:
            raise RecipeError("early_exit.layers: give at least one layer to exit after")
        if any(i < 1 for i in self.layers):
            raise RecipeError(f"early_exit.layers: {list(self.layers)} is not valid; an exit "
                              "comes after at least one layer (1 or more)")
        if list(self.layers) != sorted(set(self.layers)):
            raise RecipeError(f"early_exit.layers: {list(self.layers)} must be increasing")
        if self.draft_tokens < 1:
            raise RecipeError(f"early_exit.draft_tokens: {self.draft_tokens} is not valid; "
                              "draft at least 1 token per verification")
        if not 0.0 < self.threshold < 1.0:
            raise RecipeError(f"early_exit.threshold: {self.threshold} is not valid; give a "
                              "probability strictly between 0 and 1")
        if self.rank < 1:
            raise RecipeError(f"early_exit.rank: {self.rank} is not valid; give 1 or more")

    def check_model(self, num_layers: int) -> None:
        """Raise :class:`RecipeError` when an exit is not before the model's last layer."""
        bad = [i for i in self.layers if i >= num_layers]
        if bad:
            raise RecipeError(f"early_exit.layers: {bad} is past the model's last exit point; "
                              f"the model has {num_layers} layers, so exits go after 1.."
                              f"{num_layers - 1} layers")

    @property
    def lossy(self) -> bool:  # type: ignore[override]
        """The draft graph and confident exits change the output; the full graph does not."""
        return self.graph == "draft"

    @property
    def exit_layer(self) -> int:
        return self.layers[0]

    def run(self, program, stats) -> None:
        layers = find_layers(program)
        if not layers:
            stats.rules["early_exit"].near_misses.append(
                ("graph", "no decoder layers in the module stack (model.layers.N / h.N)"))
            return
        self.check_model(len(layers))
        share = _share(program, layers, self.exit_layer)
        if self.graph == "full":
            stats.notes.append(f"exit after {self.exit_layer} of {len(layers)} layers: the "
                               f"draft reads {share:.0%} of a step's weight bytes; this graph is "
                               "the full model (llmcompile.generate builds the draft)")
            return
        try:
            cut = cut_at_exit(program, self.exit_layer, fill_kv=self.mode == "confident",
                              adapter=self.adapter_weights(program))
        except CutError as e:
            stats.rules["early_exit"].near_misses.append(("graph", str(e)))
            raise RecipeError(f"early_exit: cannot cut this graph after layer "
                              f"{self.exit_layer}: {e}") from None
        stats.rules["early_exit"].fired += 1
        stats.notes.append(f"draft: layers 0..{self.exit_layer - 1} + {self.head} exit head "
                           f"({cut.removed} nodes of layers {self.exit_layer}.. removed"
                           + (", their K/V filled from the exit" if cut.fill_kv else "") + ")")

    def adapter_weights(self, program) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The distilled adapter ``(down, up)`` of the exit, read from ``adapter``."""
        if self.head == "shared" or self.graph == "full":
            return None
        path = self.adapter.format(layer=self.exit_layer)
        if not path:
            raise RecipeError("early_exit: head 'distilled' needs its trained adapter file "
                              "(adapter = ...); llmcompile.generate trains and stores it on "
                              "first use (llmcompile.deploy.exit_heads.train_adapter)")
        try:
            with _compat.real_tensors():
                data = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise RecipeError(f"early_exit.adapter: {path!r} does not exist") from None
        return data["down"], data["up"]


class CutError(ValueError):
    """The graph has no single value at the layer boundary (or too few layers)."""


@dataclass
class ExitCut:
    exit_value: fx.Node
    removed: int
    fill_kv: bool


def find_layers(program) -> dict[int, list[fx.Node]]:
    """Decoder layer index -> its nodes, in graph order (from the module stack)."""
    layers: dict[int, list[fx.Node]] = {}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        index = layer_index(program.module_path(node))
        if index is not None:
            layers.setdefault(index, []).append(node)
    return dict(sorted(layers.items()))


def _layer_of(program, node) -> int | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    return layer_index(program.module_path(node))


def _is_hidden(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dim() == 3 and val.dtype.is_floating_point


def _hidden_input(program, consumers: list[fx.Node], producer_layer: int | None,
                  where: str) -> fx.Node:
    """The one hidden-state value ``consumers`` read that layer ``producer_layer`` made."""
    found = {a for n in consumers for a in n.all_input_nodes
             if _layer_of(program, a) == producer_layer and _is_hidden(a)}
    if len(found) != 1:
        raise CutError(f"{where} reads {len(found)} hidden states from layer {producer_layer} "
                     "(expected exactly one)")
    return found.pop()


def _writes(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(
        a.alias_info is not None and a.alias_info.is_write for a in schema.arguments)


def _share(program, layers: dict[int, list[fx.Node]], exit_layer: int) -> float:
    """Weight bytes a draft reads (layers before the exit + everything outside layers) over a
    full step's."""
    seen: dict[fx.Node, int | None] = {}
    for node in program.graph.nodes:
        for arg in node.all_input_nodes:
            if program.is_weight(arg):
                index = _layer_of(program, node)
                seen.setdefault(arg, index)
    total = sum(program.weight(w).nbytes for w in seen)
    draft = sum(program.weight(w).nbytes for w, i in seen.items() if i is None or i < exit_layer)
    return draft / total if total else 1.0


def cut_at_exit(program, exit_layer: int, *, fill_kv: bool = False,
                adapter: tuple[torch.Tensor, torch.Tensor] | None = None) -> ExitCut:
    """Rewrite ``program`` in place into its draft graph: layers ``0..exit_layer-1``, then the
    model's own final norm and LM head on the hidden state leaving layer ``exit_layer - 1``.

    ``fill_kv``: every later layer's K/V projections run on that hidden state and are written
    to the cache (CALM); otherwise the later layers, cache writes included, are removed.
    ``adapter`` ``(down [H, r], up [r, H])``: ``h + (h @ down) @ up`` before the final norm.
    """
    graph = program.graph
    layers = find_layers(program)
    count = len(layers)
    if exit_layer < 1 or exit_layer >= count:
        raise CutError(f"exit after {exit_layer} layers: the graph has {count} layers")
    hidden = _hidden_input(program, layers[exit_layer], exit_layer - 1,
                           f"layer {exit_layer}")
    last = max(layers)
    after = [n for n in graph.nodes if n.op == "call_function" and _layer_of(program, n) is None
             and any(_layer_of(program, a) == last for a in n.all_input_nodes)]
    final = _hidden_input(program, after, last, "the final norm")
    exit_value = hidden
    if adapter is not None:
        exit_value = _insert_adapter(program, hidden, adapter)
    for user in list(final.users):
        if _layer_of(program, user) is None:
            user.replace_input_with(final, exit_value)
    removed_before = len(graph.nodes)
    for index in range(exit_layer, count):
        nodes = layers[index]
        if fill_kv and index > exit_layer:
            entering = _hidden_input(program, nodes, index - 1, f"layer {index}")
            for node in nodes:
                node.replace_input_with(entering, hidden)
    _dead_code(graph)
    if not fill_kv:  # what is left of the later layers are their cache writes
        while True:
            writes = [n for i in range(exit_layer, count) for n in layers[i]
                      if not getattr(n, "_erased", False) and _writes(n) and not n.users]
            if not writes:
                break
            for node in writes:
                graph.erase_node(node)
            _dead_code(graph)
    program.recompile()
    return ExitCut(exit_value, removed_before - len(graph.nodes), fill_kv)


def _dead_code(graph: fx.Graph) -> None:
    from llmcompile.core.fold import eliminate_dead_code

    while eliminate_dead_code(graph):
        pass


def _insert_adapter(program, hidden: fx.Node, adapter) -> fx.Node:
    down, up = adapter
    aten = torch.ops.aten
    graph = program.graph
    dtype = hidden.meta["val"].dtype
    with _compat.real_tensors():
        down, up = down.detach().to(dtype).contiguous(), up.detach().to(dtype).contiguous()
    with graph.inserting_after(hidden):
        d = program.add_constant(down, "exit_down")
    with graph.inserting_after(d):
        u = program.add_constant(up, "exit_up")
    with graph.inserting_after(u):
        low = graph.call_function(aten.matmul.default, (hidden, d))
    with graph.inserting_after(low):
        delta = graph.call_function(aten.matmul.default, (low, u))
    with graph.inserting_after(delta):
        out = graph.call_function(aten.add.Tensor, (hidden, delta))
    val = hidden.meta["val"]
    low.meta["val"] = val.new_empty((*val.shape[:-1], down.shape[1]))
    delta.meta["val"] = val.new_empty(val.shape)
    out.meta["val"] = val.new_empty(val.shape)
    for node in (low, delta, out):
        node.meta["nn_module_stack"] = {}
    return out
