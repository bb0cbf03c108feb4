"""Lowering to TorchInductor.

The rewritten pre-dispatch graph goes to ``compile_fx`` (which runs AOTAutograd, decomposes our
composite ops and fuses them). Rules a recipe places at ``post_grad`` run inside Inductor as a
``CustomGraphPass`` whose ``uuid()`` hashes the pass sources and the recipe, chained after any
pass another library already installed (never replacing it).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.fx as fx

from .. import _compat
from ..core import stages
from ..core.canonicalize import canonicalize
from ..core.program import Program
from ..core.rewrite import Stats, apply_rules
from ..core.rules import RuleSet
from ..ops import kernels
from . import decode_attention, flex, gemv
from .decode_attention import lower_decode_attention
from .flex import lower_sparse_attention
from .gemv import lower_cpu_gemv

__all__ = ["PostGradRules", "compile_inductor", "plain_inductor"]


class PostGradRules(_compat.CustomGraphPass):
    """Applies rules to Inductor's post-grad ATen graph, then calls the pass it chains to."""

    def __init__(self, rules: RuleSet, fingerprint: str, chained: Any = None):
        self.rules = rules
        self.fingerprint = fingerprint
        self.chained = chained
        self.stats = Stats()

    def __call__(self, graph: fx.Graph) -> None:
        module = graph.owning_module
        fakes = [n.meta.get("val") for n in graph.nodes if n.op == "placeholder"]
        program = Program(module, fake_mode=_compat.fake_mode_for(fakes))
        canonicalize(graph)
        apply_rules(program, self.rules, self.stats)
        if self.chained is not None:
            self.chained(graph)

    def uuid(self) -> bytes:
        h = hashlib.sha256(self.fingerprint.encode())
        for rule in self.rules:
            for fn in (rule.pattern_fn, rule.replacement, rule.check):
                if fn is not None:
                    h.update(_source(fn).encode())
        if self.chained is not None:
            other = self.chained.uuid() if hasattr(self.chained, "uuid") else None
            if other is None:  # the other library's pass cannot be cached: neither can we
                return None  # type: ignore[return-value]
            h.update(other if isinstance(other, bytes) else str(other).encode())
        return h.digest()


def _source(fn) -> str:
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return repr(fn)


def _patches(mode: str | None, post_grad: RuleSet | None, fingerprint: str,
             cpp_wrapper: bool = False) -> dict[str, Any]:
    patches = _compat.mode_options(mode)
    if cpp_wrapper:
        patches.update(_compat.cpp_wrapper_options())
    if post_grad is not None and len(post_grad):
        existing = _compat.inductor_config.post_grad_custom_post_pass
        patches["post_grad_custom_post_pass"] = PostGradRules(post_grad, fingerprint, existing)
    return patches


@functools.cache
def _lowering_version() -> str:
    """A hash of the lowering modules and the kernels' sources (the cache keys' part for the
    Python wrappers our lowerings put in graphs)."""
    files = [inspect.getsourcefile(m) for m in (decode_attention, flex, gemv)]
    csrc = Path(inspect.getsourcefile(kernels)).with_name("csrc")
    sources = sorted(str(p) for p in csrc.iterdir() if p.is_file())
    return _compat.get_hash_for_files((*files, *sources)).hex()


def _mark_lowerings_cacheable() -> None:
    """The wrappers our lowerings call (``gemv_int4``, ``decode_attention``...) are plain
    Python functions around registered ops; AOTAutograd's cache refuses such graphs unless
    they are marked, and then a warm process would recompile every decode step."""
    _compat.mark_cacheable([gemv.gemv_f32, gemv.gemv_int8, gemv.gemv_int4,
                            decode_attention.decode_attention, flex.sparse_attention,
                            flex.window_block_mask, flex.from_blocks], _lowering_version())


def compile_inductor(program: Program, example_inputs: Sequence[Any], *, mode: str | None = None,
                     post_grad: RuleSet | None = None, fingerprint: str = "",
                     cpp_wrapper: bool = False):
    """Compile the rewritten program with Inductor; returns the compiled callable.

    Sparse attention (a window, sinks or blocks) runs as FlexAttention (:mod:`.flex`).
    ``cpp_wrapper``: Inductor calls the graph's kernels from generated C++ instead of Python
    (no per-kernel Python cost; worth it for decode steps, which run many small kernels).
    Small static CPU matmuls and attentions (decode) run llmcompile's own kernels
    (:mod:`.gemv`, :mod:`.decode_attention`)."""
    with stages.stage("lower"):
        if (lower_sparse_attention(program) + lower_decode_attention(program)
                + lower_cpu_gemv(program)):
            program.recompile()
            _mark_lowerings_cacheable()
    with stages.stage("inductor"):
        return _compat.compile_fx(program.gm, example_inputs,
                                  _patches(mode, post_grad, fingerprint, cpp_wrapper))


def plain_inductor(gm: fx.GraphModule, example_inputs: Sequence[Any], mode: str | None = None,
                   cpp_wrapper: bool = False):
    """What ``torch.compile`` would do without llmcompile (the fallback)."""
    patches = _compat.mode_options(mode)
    if cpp_wrapper:
        patches.update(_compat.cpp_wrapper_options())
    return _compat.compile_fx(gm, example_inputs, patches)
