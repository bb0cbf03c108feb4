"""``llmcompile bench``: loading the model and its static cache, and the timed decode loop
(prefill, then one-token greedy steps) that every configuration runs."""

from __future__ import annotations

import inspect
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

from .. import _compat
from .measure import synchronize

PROMPT_TEXT = (
    "The history of computing is a story of abstractions built one on top of another. "
    "Early machines were programmed by rewiring panels; then came stored programs, "
    "assemblers, compilers and operating systems. Each layer hid the details of the one "
    "below it, so that people could think about larger problems. Today a language model "
    "runs on a stack of such layers: kernels, tensor libraries, graph compilers and "
    "serving systems. Explain, step by step, why memory bandwidth limits how fast a "
    "language model can generate text on a single machine, and what can be done about it. "
)


# --------------------------------------------------------------------------- helpers

def ensure_cache_dir() -> str:
    """Point Inductor at a fresh private cache folder unless the user chose one."""
    if not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llmcompile-bench-")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def load(model: str, dtype: torch.dtype, prompt_len: int, seed: int
          ) -> tuple[torch.nn.Module, torch.Tensor, Any]:
    """(model, prompt ids [1, P], tokenizer or None)."""
    from .models import ARCHITECTURES, load_smollm2, tiny_model

    if model == "smollm2":
        net, tokenizer = load_smollm2(dtype)
        text = PROMPT_TEXT
        ids = tokenizer(text, return_tensors="pt").input_ids
        while ids.shape[1] < prompt_len:
            text += PROMPT_TEXT
            ids = tokenizer(text, return_tensors="pt").input_ids
        return net, ids[:, :prompt_len].contiguous(), tokenizer
    if model in ARCHITECTURES:
        net = tiny_model(model, seed=seed).to(dtype)
        vocab = net.config.get_text_config().vocab_size
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(3, vocab, (1, prompt_len), generator=gen)
        return net, ids, None
    raise ValueError(f"unknown model {model!r}; use smollm2 or a tiny architecture: "
                     f"{', '.join(sorted(ARCHITECTURES))}")


def new_cache(net: torch.nn.Module, max_len: int, dtype: torch.dtype, device: torch.device):
    """A StaticCache, allocated up front so its buffers are marked as static addresses."""
    from transformers import StaticCache

    config = net.config.get_text_config(decoder=True)
    cache = StaticCache(config=net.config, max_cache_len=max_len)
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    if kv_heads and head_dim:
        try:
            cache.early_initialization(1, kv_heads, head_dim, dtype, device)
        except Exception:  # noqa: BLE001 - lazy initialization on the first forward still works
            cache = StaticCache(config=net.config, max_cache_len=max_len)
    return cache


class Runner:
    """Greedy generation with a static cache through ``forward`` (eager or compiled)."""

    def __init__(self, forward: Callable, net: torch.nn.Module, prompt: torch.Tensor,
                 new_tokens: int, dtype: torch.dtype):

        self.forward = forward
        self.device = prompt.device
        self.prompt = prompt
        self.new_tokens = new_tokens
        p = prompt.shape[1]
        self.cache = new_cache(net, p + new_tokens, dtype, self.device)
        self.prefill_pos = torch.arange(p, device=self.device)
        self.decode_pos = [torch.tensor([p + i], device=self.device)
                           for i in range(new_tokens - 1)]
        self.extra: dict[str, Any] = {"use_cache": True}
        self.cache_kw = _compat.cache_kwarg(net)
        if "logits_to_keep" in inspect.signature(net.forward).parameters:
            self.extra["logits_to_keep"] = 1

    def run(self) -> tuple[float, list[float], list[int]]:
        """(prefill seconds, per-step decode seconds, generated token ids)."""
        fwd, cache, sync, dev = self.forward, self.cache, synchronize, self.device
        cache.reset()
        sync(dev)
        t = time.perf_counter()
        out = fwd(input_ids=self.prompt, cache_position=self.prefill_pos,
                  **{self.cache_kw: cache}, **self.extra)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(dev)
        prefill = time.perf_counter() - t
        tokens = [tok]
        steps = []
        for pos in self.decode_pos:
            t = time.perf_counter()
            out = fwd(input_ids=tok, cache_position=pos, **{self.cache_kw: cache}, **self.extra)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            sync(dev)
            steps.append(time.perf_counter() - t)
            tokens.append(tok)
        return prefill, steps, torch.cat(tokens, dim=1)[0].tolist()
