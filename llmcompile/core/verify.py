"""``options={"verify": True}``: the first call of every compiled graph is checked against the
uncompiled graph on the same inputs, so a wrong rewrite can never go unnoticed.

Lossless recipes are compared with a tight tolerance (relative to the output's magnitude, by
dtype); lossy ones (quantization) by top-1 agreement of the logits, the output with the widest
last dimension. Inputs the graph writes in place (a static KV cache) are cloned for the
reference run and compared afterwards too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

__all__ = ["TOLERANCE", "TOP1_AGREEMENT", "VerificationError", "verified"]

#: lossless: max |compiled - reference| <= tol * max(1, max |reference|)
TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.bfloat16: 6e-2,
             torch.float16: 2e-2}
#: lossy: fraction of positions whose argmax over the logits agrees with the reference
TOP1_AGREEMENT = 0.5


class VerificationError(RuntimeError):
    """The compiled graph disagrees with the uncompiled one (``graph`` holds the latter)."""

    def __init__(self, message: str, graph: fx.GraphModule):
        super().__init__(message)
        self.graph = graph


def verified(compiled: Callable, reference: fx.GraphModule, *, lossy: bool,
             mutated: Sequence[int], label: str) -> Callable:
    """``compiled``, checked against ``reference`` on its first call."""
    pending = [True]

    def run(*args):
        if not pending:
            return compiled(*args)
        pending.clear()
        flat = list(args)  # Dynamo calls a backend's callable with the flat inputs
        ref_args = [a.clone() if i in mutated and isinstance(a, torch.Tensor) else a
                    for i, a in enumerate(flat)]
        with torch.no_grad():
            want = reference(*ref_args)
        got = compiled(*args)
        pairs = list(zip(_tensors(got), _tensors(want)))
        if not lossy:
            pairs += [(flat[i], ref_args[i]) for i in mutated]
        check(pairs, lossy=lossy, label=label, graph=reference)
        return got

    return run


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def check(pairs: list[tuple[torch.Tensor, torch.Tensor]], *, lossy: bool, label: str,
          graph: fx.GraphModule) -> None:
    """Raise :class:`VerificationError` where a compiled value disagrees with its reference."""
    for i, (got, want) in enumerate(pairs):
        if got.shape != want.shape:
            raise VerificationError(f"{label}: output {i} has shape {tuple(got.shape)}, the "
                                    f"uncompiled graph gives {tuple(want.shape)}", graph)
        if not want.is_floating_point():
            if not lossy and not torch.equal(got.cpu(), want.cpu()):
                raise VerificationError(f"{label}: integer output {i} differs", graph)
            continue
        if not torch.isfinite(got).all() and torch.isfinite(want).all():
            raise VerificationError(f"{label}: output {i} has non-finite values the "
                                    "uncompiled graph does not have", graph)
        if lossy:
            continue
        err, bound = _error(got, want)
        if err > bound:
            raise VerificationError(f"{label}: output {i} {tuple(want.shape)} differs from the "
                                    f"uncompiled graph by {err:.3g} (bound {bound:.3g} for a "
                                    "lossless recipe)", graph)
    if lossy:
        _check_top1(pairs, label, graph)


def _error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    want64, got64 = want.detach().double().cpu(), got.detach().double().cpu()
    scale = max(1.0, float(want64.abs().max())) if want64.numel() else 1.0
    err = float((got64 - want64).abs().max()) if want64.numel() else 0.0
    return err, TOLERANCE.get(want.dtype, 1e-3) * scale


def _check_top1(pairs, label: str, graph) -> None:
    floats = [(g, w) for g, w in pairs if w.is_floating_point() and w.dim() >= 2
              and w.shape[-1] > 1]
    if not floats:
        return
    got, want = max(floats, key=lambda p: p[1].shape[-1])  # the logits
    agree = float((got.argmax(-1).cpu() == want.argmax(-1).cpu()).float().mean())
    if agree < TOP1_AGREEMENT:
        err, _ = _error(got, want)
        raise VerificationError(f"{label}: top-1 agreement with the uncompiled graph is "
                                f"{agree:.1%} (bound {TOP1_AGREEMENT:.0%} for a lossy recipe); "
                                f"largest error {err:.3g}", graph)
