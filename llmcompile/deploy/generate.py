"""Greedy generation through compiled graphs: plain, self-speculative, or with confident exit.

    ids = llmcompile.generate(model, input_ids, recipe="early-exit", max_new_tokens=64)

The graphs of one model under one recipe are compiled once and kept (:func:`session`):
prefill (every prompt length >= 2 in one graph), the full one-token step, the verification step of
``draft_tokens + 1`` tokens and the draft / exit graphs (static shapes), all over one static
KV cache. Per token the loop does the compiled step and an argmax, nothing else.

- no ``early_exit`` pass: plain greedy decoding (like for like with the other modes);
- ``mode = "speculative"``: the draft graph (first ``L`` layers + exit head) proposes
  ``draft_tokens`` tokens one by one, the full graph verifies them in one forward, the longest
  agreeing prefix plus the full model's own next token are kept and the cache is rolled back
  to them. The output is token for token the full model's greedy output;
- ``mode = "confident"``: each token tries the exits in order and stops at the first whose top
  probability reaches ``threshold``; the layers it skipped get their K/V for that position from
  the exit hidden state (CALM), else the full model runs. Lossy.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import time
import types
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import _compat
from ..core import stages
from ..core.program import collect_compiled
from ..core.recipe import Recipe, RecipeError
from ..quant.calibrate import register_model
from . import direct as _direct

log = logging.getLogger("llmcompile")

__all__ = ["GenerationStats", "Session", "early_exit_config", "generate", "session"]

_CACHE_BUCKET = 256
#: Dynamo's per-function limit while generating: a graph's own entry point sees a few shapes
#: (a static then a dynamic prefill; a verification step per draft length)
_RECOMPILES = 64


class _DraftPolicy:
    """When to draft (``adaptive = true``): compare the measured rate of speculative rounds,
    ``E / (t_draft + t_verify)`` with ``E = 1 + a + ... + a^k`` expected tokens per round at
    acceptance ``a``, with the rate of plain steps, ``1 / t_step``; decode plainly while that is
    faster, and probe with a few speculative rounds after each plain run (64 tokens, doubled
    after every probe that loses, up to 1,024). Both paths emit the full model's greedy tokens,
    so the choice changes speed only."""

    _PROBE = 8  # speculative rounds per probe
    _PLAIN_RUN = 64  # plain tokens between probes, doubled per losing probe
    _LONGEST_RUN = 1024

    def __init__(self, k: int):
        self.k = k
        self.accepted = self.drafted = 0
        self.round_s = self.step_s = 0.0
        self.rounds = self.steps = 0
        self.left = self._PROBE  # speculative rounds (> 0) or plain steps (< 0) before deciding
        self.probe_next = False
        self.plain_run = self._PLAIN_RUN

    def draft(self) -> bool:
        if self.left > 0:
            return True
        if self.left < 0:
            return False
        if self.steps < 4:  # time a few plain steps once, before the first decision
            self.left = -4
        elif self.probe_next:  # a plain run has ended: probe before deciding again
            self.probe_next = False
            self.left = self._PROBE
        else:
            a = self.accepted / max(1, self.drafted)
            expected = sum(a ** i for i in range(self.k + 1))
            if expected * self.rounds / self.round_s > self.steps / self.step_s:
                self.left, self.plain_run = self._PROBE, self._PLAIN_RUN
            else:
                self.left, self.probe_next = -self.plain_run, True
                self.plain_run = min(2 * self.plain_run, self._LONGEST_RUN)
        return self.left > 0

    def timed_round(self, draft_s: float, verify_s: float, accepted: int) -> None:
        self.round_s += draft_s + verify_s
        self.rounds += 1
        self.accepted += accepted
        self.drafted += self.k
        self.left -= 1

    def timed_step(self, seconds: float) -> None:
        self.step_s += seconds
        self.steps += 1
        self.left += 1


def _entry_point(model: torch.nn.Module, label: str):
    """``model.forward`` behind a code object of its own.

    Dynamo keeps compiled graphs per code object and, on every call, checks the guards of each
    graph on that code object until one passes. Compiling every session's prefill, step, draft
    and verification graphs on ``model.forward`` itself would make each decode step walk all of
    them (measured: 14 -> 9 tok/s on SmolLM2 with three sessions). A fresh code object per graph
    keeps each step's guard check to its own graph."""
    def forward(**kwargs):
        return model.forward(**kwargs)

    code = forward.__code__.replace(co_name=f"llmcompile_{label}")
    return types.FunctionType(code, forward.__globals__, code.co_name, None, forward.__closure__)


@dataclass
class GenerationStats:
    """What one :func:`generate` call did."""

    mode: str = "greedy"
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    #: speculative: full-model forwards after the prefill; drafted / accepted draft tokens
    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    #: speculative with ``adaptive``: tokens decoded by plain steps while drafting did not pay
    plain_steps: int = 0
    #: confident: tokens that stopped at each exit (layer -> count); decoder layers run per
    #: token on average (an exit counts its layers, a full step all of them)
    exits: dict[int, int] = field(default_factory=dict)
    depth: int = 0
    layers_run: int = 0
    num_layers: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens per speculative round (tokens decoded by plain steps left out)."""
        drafted_rounds = self.new_tokens - self.plain_steps
        return drafted_rounds / self.verifications if self.verifications else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s else 0.0

    @property
    def mean_layers(self) -> float:
        """Layers each token went through before its exit (the full model: all of them)."""
        return self.depth / self.new_tokens if self.new_tokens else 0.0

    @property
    def mean_layers_run(self) -> float:
        """Decoder layers computed per token (a token that tried an exit in vain pays for it)."""
        return self.layers_run / self.new_tokens if self.new_tokens else 0.0

    def format(self) -> str:
        line = (f"{self.mode}: {self.new_tokens} new tokens in {self.decode_s:.2f} s "
                f"({self.tokens_per_s:.1f} tok/s), prefill {self.prefill_s * 1000:.0f} ms")
        if self.mode == "speculative":
            line += (f"; acceptance {self.acceptance_rate:.0%}, "
                     f"{self.tokens_per_verification:.2f} tokens per verification")
            if self.plain_steps:
                line += (f"; {self.plain_steps} tokens decoded without drafting (adaptive: "
                         "drafting did not pay)")
        if self.mode == "confident":
            line += (f"; exits at {self.mean_layers:.1f} of {self.num_layers} layers per "
                     f"token ({self.mean_layers_run:.1f} computed), exits "
                     f"{dict(sorted(self.exits.items()))}")
        return line


def early_exit_config(recipe: Recipe):
    """The recipe's ``early_exit`` pass config, or None."""
    found = [p for p in recipe.passes if p.name == "early_exit"]
    if len(found) > 1:
        raise RecipeError("a recipe may have one early_exit pass")
    return found[0] if found else None


def _num_layers(model: torch.nn.Module) -> int:
    config = model.config.get_text_config(decoder=True)
    return int(config.num_hidden_layers)


def _with_exit(recipe: Recipe, config, **changes) -> Recipe:
    passes = tuple(dataclasses.replace(p, **changes) if p is config else p
                   for p in recipe.passes)
    return dataclasses.replace(recipe, passes=passes)


def cpp_wrapper_default(model: torch.nn.Module) -> bool:
    """Whether :class:`Session` compiles its static graphs with Inductor's C++ wrapper: on a
    CPU model (a decode step runs hundreds of small kernels; the Python wrapper's cost per
    kernel was a third of a SmolLM2 int4 step), unless ``LLMCOMPILE_CPP_WRAPPER=0``."""
    if os.environ.get("LLMCOMPILE_CPP_WRAPPER", "1") == "0":
        return False
    param = next(model.parameters(), None)
    return param is None or param.device.type == "cpu"


class Session:
    """The compiled graphs of one model under one recipe, and their static KV cache."""

    def __init__(self, model: torch.nn.Module, recipe: Recipe, tokenizer: Any = None,
                 adapters: dict[int, str] | None = None, cpp_wrapper: bool | None = None):
        self.model = model
        register_model(model)  # calibration runs it (prompt-independent windows)
        self.recipe = recipe
        self.num_layers = _num_layers(model)
        self.exit = early_exit_config(recipe)
        if self.exit is not None:
            self.exit.check_model(self.num_layers)
        self.cache_kw = _compat.cache_kwarg(model)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        options: dict[str, Any] = {"fallback": False}
        if tokenizer is not None:
            options["tokenizer"] = tokenizer
        full = recipe if self.exit is None else _with_exit(recipe, self.exit, graph="full")

        # the static graphs (decode step, drafts, verification) call their kernels from C++
        if cpp_wrapper is None:
            cpp_wrapper = cpp_wrapper_default(model)
        wrapper = {"cpp_wrapper": cpp_wrapper}

        def compiled(r: Recipe, dynamic: bool | None, label: str):
            extra = wrapper if dynamic is False else {}
            return torch.compile(_entry_point(model, label), backend="llmcompile",
                                 dynamic=dynamic, options={**options, **extra, "recipe": r})
        self.prefill = compiled(full, None, "prefill")
        self.step = compiled(full, False, "step")
        self.exits: dict[int, Any] = {}
        if self.exit is not None:
            mode = self.exit.mode
            layers = self.exit.layers[:1] if mode == "speculative" else self.exit.layers
            for layer in layers:
                changes: dict[str, Any] = {"graph": "draft", "layers": (layer,)}
                if self.exit.head == "distilled":
                    changes["adapter"] = (adapters or {})[layer]
                self.exits[layer] = compiled(_with_exit(recipe, self.exit, **changes), False,
                                             f"exit{layer}")
        self.cache = None
        self.max_len = 0
        #: the step graph called without Dynamo (:mod:`.direct`), once checked safe
        self._direct: _direct.DirectGraph | None = None
        self._direct_ready = False
        self._length: int | None = None  # the cache's length where known (direct steps)

    # ------------------------------------------------------------------ steps

    def reserve(self, length: int) -> None:
        """Size the static cache for ``length`` positions (prompt + new tokens + drafts)."""
        if self.cache is None or self.max_len < length:
            self._cache_for(length)

    def _cache_for(self, length: int):
        if self.cache is None or self.max_len < length:
            from transformers import StaticCache

            self.max_len = -(-length // _CACHE_BUCKET) * _CACHE_BUCKET
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.max_len)
            _compat.init_static_cache(self.cache, self.model)
            if self._direct is not None and not self._direct.bind(self.cache):
                self._direct = None
        else:
            self.cache.reset()
        self._length = 0
        return self.cache

    def prefill_logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Last-position logits [vocab] of a prompt ``ids`` [1, n] written at positions 0..n-1.

        The prefill graph is compiled for every length >= 2 at once (its length marked
        dynamic before the first call), so no later prompt length compiles anything; a
        1-token prompt is a decode step at position 0 (the static step graph)."""
        if ids.shape[1] == 1:
            return self.decode_step(int(ids[0, 0]), 0)
        return self._run(self.prefill, ids, 0, dynamic=True)[-1]

    def _run(self, fn, ids: torch.Tensor, start: int, keep: int = 1,
             dynamic: bool = False) -> torch.Tensor:
        """Logits of ``ids`` [1, n] placed at positions ``start..start+n-1``."""
        _compat.set_cache_length(self.cache, start)
        self._length = None
        extra = {"logits_to_keep": keep} if self._keep else {}
        positions = torch.arange(start, start + ids.shape[1])
        if dynamic:
            _compat.mark_dynamic_length(ids, 1)
            _compat.mark_dynamic_length(positions, 0)
        out = fn(input_ids=ids, cache_position=positions, use_cache=True,
                 **{self.cache_kw: self.cache}, **extra)
        return out.logits[0]

    def decode_step(self, token: int, pos: int) -> torch.Tensor:
        """Logits [vocab] of the full model after ``token`` at position ``pos`` (its K/V
        written to the cache there). The compiled step graph is called without Dynamo once
        that is known to be safe (:mod:`.direct`): the first call compiles it through Dynamo,
        the second checks that Dynamo does nothing outside the graph, later ones skip it."""
        ids = torch.tensor([[token]])
        found = self._direct
        if found is not None and self._direct_ready:
            if self._length != pos:
                _compat.set_cache_length(self.cache, pos)
            row = found(ids, torch.tensor([pos]))[-1]
            self._length = pos + 1
            return row
        before = _direct.python_state(self.cache) if found is not None else None
        with collect_compiled() as graphs:
            row = self._run(self.step, ids, pos)[-1]
        if graphs:
            self._direct = (_direct.build(graphs, self.model, self.cache)
                            if _direct.enabled() else None)
            self._direct_ready = False
        elif found is not None:
            self._direct_ready = before == _direct.python_state(self.cache)
            if not self._direct_ready:
                log.debug("llmcompile: decode steps stay on Dynamo: a step changes the cache's "
                          "Python state outside the graph")
                self._direct = None
        return row

    # ------------------------------------------------------------------ decoding loops

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> tuple[torch.Tensor, GenerationStats]:
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.shape[0] != 1:
            raise ValueError(f"llmcompile.generate decodes one prompt at a time, got a batch "
                             f"of {ids.shape[0]}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        try:
            with _compat.recompile_limit(_RECOMPILES):
                return self._generate(ids, max_new_tokens, eos_token_id)
        finally:
            stages.report()  # LLMCOMPILE_PROFILE=1: where the compile time went

    def _generate(self, ids, max_new_tokens, eos_token_id):
        prompt = ids.shape[1]
        draft = self.exit.draft_tokens if self.exit is not None else 0
        self._cache_for(prompt + max_new_tokens + draft + 1)
        mode = "greedy" if self.exit is None else self.exit.mode
        stats = GenerationStats(mode=mode, prompt_tokens=prompt, num_layers=self.num_layers)
        start = time.perf_counter()
        first = int(self.prefill_logits(ids).argmax())
        stats.prefill_s = time.perf_counter() - start
        loop = {"greedy": self._greedy, "speculative": self._speculative,
                "confident": self._confident}[mode]
        start = time.perf_counter()
        out = loop(first, prompt, max_new_tokens, eos_token_id, stats)
        stats.decode_s = time.perf_counter() - start
        stats.new_tokens = len(out)
        return torch.cat([ids, torch.tensor([out], dtype=ids.dtype)], dim=1), stats

    @torch.no_grad()
    def score(self, input_ids: torch.Tensor, prefix: int) -> torch.Tensor:
        """Teacher-forced next-token logits through the compiled graphs, as decoding runs them:
        the first ``prefix`` tokens in one prefill, then one decode step per token. Row ``i``
        of the result predicts token ``prefix + i`` (``len - prefix`` rows, float32)."""
        ids = torch.as_tensor(input_ids).reshape(-1)
        if not 0 < prefix < ids.numel():
            raise ValueError(f"prefix must be in [1, {ids.numel() - 1}], got {prefix}")
        self._cache_for(ids.numel() + 1)
        rows = [self.prefill_logits(ids[None, :prefix])]
        for pos in range(prefix, ids.numel() - 1):
            rows.append(self.decode_step(int(ids[pos]), pos))
        return torch.stack(rows).float()

    def _greedy(self, token, pos, budget, eos, stats) -> list[int]:
        out = [token]
        while len(out) < budget and token != eos:
            token = int(self.decode_step(token, pos).argmax())
            out.append(token)
            pos += 1
        stats.layers_run = stats.depth = len(out) * self.num_layers
        return out

    def _speculative(self, token, pos, budget, eos, stats) -> list[int]:
        (layer, draft_fn), = self.exits.items()
        k = self.exit.draft_tokens
        policy = _DraftPolicy(k) if self.exit.adaptive else None
        out = [token]
        while len(out) < budget and token != eos:
            if policy is not None and not policy.draft():
                start = time.perf_counter()
                token = int(self.decode_step(token, pos).argmax())
                policy.timed_step(time.perf_counter() - start)
                out.append(token)
                pos += 1
                stats.plain_steps += 1
                continue
            start = time.perf_counter()
            drafts, t = [], token
            for i in range(k):
                t = int(self._run(draft_fn, torch.tensor([[t]]), pos + i)[-1].argmax())
                drafts.append(t)
            drafted = time.perf_counter()
            block = torch.tensor([[token, *drafts]])
            verified = self._run(self.step, block, pos, keep=0).argmax(-1).tolist()
            accepted = 0
            while accepted < k and drafts[accepted] == verified[accepted]:
                accepted += 1
            if policy is not None:
                policy.timed_round(drafted - start, time.perf_counter() - drafted, accepted)
            stats.verifications += 1
            stats.drafted += k
            stats.accepted += accepted
            for t in verified[:accepted + 1]:
                out.append(t)
                if t == eos or len(out) >= budget:
                    break
            token = out[-1]
            pos += accepted + 1
        _compat.set_cache_length(self.cache, pos)
        stats.layers_run = ((stats.verifications + stats.plain_steps + 1) * self.num_layers
                            + stats.drafted * layer)
        stats.depth = len(out) * self.num_layers
        return out

    def _confident(self, token, pos, budget, eos, stats) -> list[int]:
        out = [token]  # from the prefill: the full model
        stats.depth = stats.layers_run = self.num_layers
        while len(out) < budget and token != eos:
            token, layers = self.confident_step(token, pos, stats)[0]
            out.append(token)
            pos += 1
        return out

    def confident_step(self, token: int, pos: int, stats: GenerationStats
                       ) -> tuple[tuple[int, int], torch.Tensor]:
        """One confident-exit step for ``token`` at ``pos``: ((next token, layers run), the
        log-probabilities the token was chosen from)."""
        threshold = self.exit.threshold
        ids = torch.tensor([[token]])
        for layer, fn in self.exits.items():
            logp = self._run(fn, ids, pos)[-1].float().log_softmax(-1)
            stats.layers_run += layer
            top = logp.max()
            if float(top.exp()) >= threshold:
                stats.exits[layer] = stats.exits.get(layer, 0) + 1
                stats.depth += layer
                return (int(logp.argmax()), layer), logp
        logp = self._run(self.step, ids, pos)[-1].float().log_softmax(-1)
        stats.layers_run += self.num_layers
        stats.exits[self.num_layers] = stats.exits.get(self.num_layers, 0) + 1
        stats.depth += self.num_layers
        return (int(logp.argmax()), self.num_layers), logp


_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def session(model: torch.nn.Module, recipe: Recipe, tokenizer: Any = None,
            adapters: dict[int, str] | None = None) -> Session:
    """The :class:`Session` of ``model`` under ``recipe`` (compiled once, then reused)."""
    per_model = _sessions.setdefault(model, {})
    config = early_exit_config(recipe)
    # the confidence threshold changes no graph: one session serves every threshold
    keyed = _with_exit(recipe, config, threshold=0.5) if config is not None else recipe
    key = (keyed.fingerprint(), tuple(sorted((adapters or {}).items())))
    if key not in per_model:
        per_model[key] = Session(model, recipe, tokenizer, adapters)
    found = per_model[key]
    found.exit = config
    return found


def generate(model: torch.nn.Module, input_ids: Any, recipe: Recipe, *,
             max_new_tokens: int = 32, eos_token_id: int | None = None, tokenizer: Any = None,
             adapters: dict[int, str] | None = None
             ) -> tuple[torch.Tensor, GenerationStats]:
    """Greedy generation of ``max_new_tokens`` tokens (fewer at ``eos_token_id``) through the
    compiled graphs of ``model`` under ``recipe``: ``(ids [1, prompt + new], stats)``."""
    return session(model, recipe, tokenizer, adapters).generate(
        input_ids, max_new_tokens, eos_token_id)
