"""A small runner for files written by ``llmcompile.export``: forward steps and greedy decoding.

    lm = OnnxCausalLM("out/model.onnx")          # CUDA provider if available, else CPU
    tokens = lm.generate([1, 2, 3], max_new_tokens=32)

Steps run on numpy arrays; the session is opened like the ``onnxruntime`` target's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..lower.onnxruntime import session
from ..ops.onnx import CPU as _CPU
from ..ops.onnx import CUDA as _CUDA

log = logging.getLogger("llmcompile")

__all__ = ["OnnxCausalLM"]

_DTYPES = {"float32": np.float32, "float16": np.float16}
_warned = False


class OnnxCausalLM:
    """An exported causal LM in an ``onnxruntime.InferenceSession``, with its KV cache."""

    def __init__(self, path: str | Path, provider: str | None = None,
                 threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        sidecar = self.path.with_name(self.path.stem + ".llmcompile.json")
        if not sidecar.is_file():
            raise FileNotFoundError(f"{sidecar} is missing: export the model with "
                                    "llmcompile.export (or `llmcompile export`)")
        self.meta = json.loads(sidecar.read_text())
        if self.meta["dtype"] not in _DTYPES:
            raise ValueError(f"exported dtype {self.meta['dtype']} is not supported by the "
                             f"runner (use one of {', '.join(_DTYPES)})")
        available = ort.get_available_providers()
        if provider is None:
            global _warned
            provider = _CUDA if _CUDA in available else _CPU
            if provider == _CPU and not _warned:
                _warned = True
                log.warning("llmcompile: ONNX Runtime has no CUDAExecutionProvider here "
                            "(install onnxruntime-gpu for GPUs); running on the CPU provider")
        elif provider not in available:
            raise ValueError(f"provider {provider!r} is not available; this onnxruntime has "
                             f"{', '.join(available)}")
        self.provider = provider
        self.session = session(self.path, provider, threads)
        self.dtype = _DTYPES[self.meta["dtype"]]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.meta["kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.meta["layers"])]

    def forward(self, input_ids: np.ndarray, past: Sequence[np.ndarray] | None = None,
                position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: ``(logits [B, S, V], present)`` for ``input_ids [B, S]`` after ``past``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        batch, seq = input_ids.shape
        past = list(past) if past is not None else self.empty_cache(batch)
        if position_ids is None:
            start = past[0].shape[2] if past else 0
            position_ids = np.broadcast_to(np.arange(start, start + seq), (batch, seq))
        feed = {"input_ids": input_ids,
                "position_ids": np.ascontiguousarray(position_ids, dtype=np.int64)}
        feed.update(zip(self.meta["inputs"][2:], past))
        logits, *present = self.session.run(None, feed)
        return logits, present

    def generate(self, input_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding of one prompt; returns the new token ids (stops at EOS)."""
        eos = eos_token_id if eos_token_id is not None else self.meta.get("eos_token_id")
        logits, past = self.forward(np.asarray(input_ids, dtype=np.int64)[None])
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if eos is not None and token == eos:
                break
            logits, past = self.forward(np.array([[token]], dtype=np.int64), past)
        return out
