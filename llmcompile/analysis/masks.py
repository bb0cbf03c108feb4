"""What an attention mask built from sizes alone means: causal, sliding window, or neither.

Models build their causal mask from ``arange`` comparisons of the query and key positions;
which op spelling they use differs across transformers versions. Rather than matching every
spelling, :func:`causal_window` evaluates the mask's subgraph on a grid of sizes (every
combination of its size symbols up to :data:`GRID`; a static graph at its one size) and
compares it with a causal mask aligned bottom-right, optionally windowed. A window is a
literal in the graph, so symbolic sizes are also probed just past every integer constant the
mask's ops take (up to :data:`MAX_PROBE`; a larger constant declines). A mask that reads any
tensor data (padding from an ``attention_mask`` input) is never classified.
"""

from __future__ import annotations

import itertools
from typing import Any

import sympy
import torch
import torch.fx as fx

__all__ = ["GRID", "causal_window"]

GRID = 6
MAX_PROBE = 4096 + 2
_SIZE_OPS = {torch.ops.aten.sym_size.int}


def _subgraph(mask: fx.Node) -> list[fx.Node] | str:
    """Ancestors of ``mask`` in graph order; a reason string when it reads tensor data."""
    seen: set[fx.Node] = set()
    todo = [mask]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.op == "placeholder":
            if isinstance(node.meta.get("val"), torch.Tensor):
                return f"the mask reads the data of input %{node.name}"
            continue
        if node.op == "get_attr":
            return f"the mask reads the constant %{node.name}"
        if node.target in _SIZE_OPS:
            continue  # a size of a tensor, not its data
        todo.extend(n for n in node.all_input_nodes)
    order = {n: i for i, n in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _symbols(nodes: list[fx.Node]) -> set[sympy.Symbol]:
    out: set[sympy.Symbol] = set()
    for node in nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt):
            out |= val.node.expr.free_symbols
    return out


def _evaluate(nodes: list[fx.Node], values: dict[sympy.Symbol, int]) -> torch.Tensor:
    env: dict[fx.Node, Any] = {}

    def load(a):
        return fx.node.map_arg(a, lambda n: env[n])

    for node in nodes:
        val = node.meta.get("val")
        if node.op == "placeholder" or node.target in _SIZE_OPS:
            env[node] = int(val.node.expr.subs(values)) if isinstance(val, torch.SymInt) else val
            continue
        env[node] = node.target(*load(node.args), **load(node.kwargs))
    return env[nodes[-1]]


def _reference(s: int, t: int, window: int) -> torch.Tensor:
    q = torch.arange(s).unsqueeze(-1) + (t - s)
    k = torch.arange(t).unsqueeze(0)
    keep = k <= q
    return keep & (q - k < window) if window > 0 else keep


def _window_of(mask: torch.Tensor) -> int | None:
    """The window (0 = none) for which ``mask [.., S, T]`` is causal, or None."""
    if mask.dtype != torch.bool:
        mask = mask == 0  # additive: 0 keeps, -inf drops
    s, t = mask.shape[-2:]
    full = mask.reshape(-1, s, t)
    if not bool((full == full[:1]).all()):
        return None  # differs across batch or heads
    plane = full[0]
    widths = plane.sum(-1)  # keys each query sees
    window = 0 if bool((plane == _reference(s, t, 0)).all()) else int(widths.max())
    return window if bool((plane == _reference(s, t, window)).all()) else None


def _constants(nodes: list[fx.Node]) -> set[int]:
    """Integer literals the mask's ops take (a window would be one of them)."""
    out: set[int] = set()

    def visit(a):
        if isinstance(a, (list, tuple)):
            for b in a:
                visit(b)
        elif isinstance(a, int) and not isinstance(a, bool) and GRID < abs(a) < 2**31:
            out.add(abs(a))

    for node in nodes:
        visit(node.args)
        visit(tuple(node.kwargs.values()))
    return out


def _probes(symbols: list, constants: set[int]) -> list[tuple[int, ...]] | str:
    """Size combinations to check: the full grid, plus every symbol just past each constant."""
    combos = list(itertools.product(range(1, GRID + 1), repeat=len(symbols)))
    for c in sorted(constants):
        if c + 2 > MAX_PROBE:
            return (f"the mask uses the constant {c}; a window that wide cannot be checked "
                    f"(probes stop at {MAX_PROBE})")
        combos += [(c + 1,) * len(symbols), (c + 2,) * len(symbols)]
    return combos


def causal_window(mask: fx.Node) -> int | str:
    """The window of a causal mask built from sizes (0 = plain causal), or why it is not one."""
    nodes = _subgraph(mask)
    if isinstance(nodes, str):
        return nodes
    symbols = sorted(_symbols(nodes), key=str)
    probes = _probes(symbols, _constants(nodes)) if symbols else [()]
    if isinstance(probes, str):
        return probes
    windows: set[int] = set()
    try:
        for combo in probes:
            value = _evaluate(nodes, dict(zip(symbols, combo)))
            if not isinstance(value, torch.Tensor) or value.dim() < 2:
                return "the mask is not a tensor of at least 2 dims"
            window = _window_of(value)
            if window is None:
                return (f"the mask at sizes {dict(zip(map(str, symbols), combo))} is not "
                        "causal (padding, bidirectional or a custom pattern)")
            if window:
                windows.add(window)
    except Exception as e:  # a size combination the model's own checks reject
        return f"the mask could not be evaluated on sizes alone: {type(e).__name__}: {e}"
    if len(windows) > 1:
        return f"the mask's window changes with the sizes ({sorted(windows)})"
    return windows.pop() if windows else 0
