"""Classifying attention masks built from sizes: causal, sliding window, or neither."""

import torch

from llmcompile.analysis.masks import causal_window
from llmcompile.core.program import capture_function


def _mask_node(fn, *args):
    program = capture_function(fn, list(args))
    out = [n for n in program.graph.nodes if n.op == "output"][0].args[0]
    return out[0] if isinstance(out, (list, tuple)) else out


def causal(x):  # x [B, S, D]: the mask depends on S only
    pos = torch.arange(x.shape[1])
    return (pos[None, :] <= pos[:, None])[None, None].expand(x.shape[0], 1, -1, -1)


def windowed(x, window):
    pos = torch.arange(x.shape[1])
    d = pos[:, None] - pos[None, :]
    return ((d >= 0) & (d < window))[None, None]


def bidirectional(x):
    s = x.shape[1]
    return torch.ones(1, 1, s, s, dtype=torch.bool)


def padded(x, keep):
    return causal(x) & keep[:, None, None, :].bool()


def test_causal_mask_from_sizes():
    assert causal_window(_mask_node(causal, torch.randn(2, 9, 4))) == 0


def test_window_wider_than_the_grid_is_found():
    assert causal_window(_mask_node(lambda x: windowed(x, 50), torch.randn(2, 9, 4))) == 50


def test_window_too_wide_to_probe_declines():
    reason = causal_window(_mask_node(lambda x: windowed(x, 100_000), torch.randn(2, 9, 4)))
    assert "cannot be checked" in reason


def test_bidirectional_and_padding_masks_decline():
    assert "not causal" in causal_window(_mask_node(bidirectional, torch.randn(2, 9, 4)))
    reason = causal_window(_mask_node(padded, torch.randn(2, 9, 4), torch.ones(2, 9)))
    assert "reads the data of input" in reason
