"""A small runner for files written by ``llmcompile.export``: forward steps and greedy decoding.

    lm = OnnxCausalLM("out/model.onnx")          # CUDA provider if available, else CPU
    tokens = lm.generate([1, 2, 3], max_new_tokens=32)

Steps run on numpy arrays; the session is opened like the ``onnxruntime`` target's.

A file exported with an ``early_exit`` recipe has a draft beside it (``<name>.draft.onnx``, the
first ``L`` layers + the model's final norm and LM head, named in the sidecar). The runner
opens it too and :meth:`OnnxCausalLM.generate` decodes self-speculatively: the draft proposes
``draft_tokens`` tokens one by one on the first ``L`` layers' cache, the full model verifies
``[last, d1..dk]`` in one step, the longest agreeing prefix plus the full model's own next
token are kept and every cache array is cut back to them. The tokens are the full model's
greedy ones; ``lm.last_stats`` says how many drafts were accepted (``speculative=False``:
plain greedy decoding with the full model only).
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
from .generate import GenerationStats

log = logging.getLogger("llmcompile")

__all__ = ["OnnxCausalLM"]

_DTYPES = {"float32": np.float32, "float16": np.float16}
_warned = False


class OnnxCausalLM:
    """An exported causal LM in an ``onnxruntime.InferenceSession``, with its KV cache (and
    its early-exit draft in a second session when the export wrote one)."""

    def __init__(self, path: str | Path, provider: str | None = None,
                 threads: int | None = None, speculative: bool = True):
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
        #: the draft's sidecar section (file, exit_layer, draft_tokens, I/O) and session
        self.draft_meta = self.meta.get("draft") if speculative else None
        self.draft = None
        self.draft_tokens = 0
        if self.draft_meta is not None:
            self.draft = session(self.path.with_name(self.draft_meta["file"]), provider, threads)
            self.draft_tokens = int(self.draft_meta["draft_tokens"])
        self.last_stats: GenerationStats | None = None

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        shape = (batch, self.meta["kv_heads"], 0, self.meta["head_dim"])
        return [np.zeros(shape, self.dtype) for _ in range(2 * self.meta["layers"])]

    def forward(self, input_ids: np.ndarray, past: Sequence[np.ndarray] | None = None,
                position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step: ``(logits [B, S, V], present)`` for ``input_ids [B, S]`` after ``past``."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        batch = input_ids.shape[0]
        past = list(past) if past is not None else self.empty_cache(batch)
        return self._run(self.session, self.meta["inputs"], input_ids, past, position_ids)

    @staticmethod
    def _run(sess, names: Sequence[str], input_ids: np.ndarray, past: Sequence[np.ndarray],
             position_ids: np.ndarray | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """One step of ``sess``. ``names``: the file's inputs (the sidecar's): ``input_ids``,
        then ``position_ids`` and / or ``attention_mask`` (a file of another exporter: all
        ones, rows have equal lengths), then the past arrays."""
        batch, seq = input_ids.shape
        start = past[0].shape[2] if past else 0
        feed = {"input_ids": input_ids}
        if "position_ids" in names:
            if position_ids is None:
                position_ids = np.broadcast_to(np.arange(start, start + seq), (batch, seq))
            feed["position_ids"] = np.ascontiguousarray(position_ids, dtype=np.int64)
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((batch, start + seq), dtype=np.int64)
        feed.update(zip(names[len(feed):], past))
        logits, *present = sess.run(None, feed)
        return logits, present

    def generate(self, input_ids: Sequence[int] | np.ndarray, max_new_tokens: int,
                 eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding of one prompt; returns the new token ids (stops at EOS).
        Self-speculative when the file has a draft (same tokens); see ``last_stats``."""
        eos = eos_token_id if eos_token_id is not None else self.meta.get("eos_token_id")
        logits, past = self.forward(np.asarray(input_ids, dtype=np.int64)[None])
        stats = self.last_stats = GenerationStats("greedy" if self.draft is None else "speculative")
        out: list[int] = []
        if max_new_tokens < 1:
            return out
        out.append(int(logits[0, -1].argmax()))
        if self.draft is None:
            while len(out) < max_new_tokens and out[-1] != eos:
                logits, past = self.forward(np.array([[out[-1]]], dtype=np.int64), past)
                out.append(int(logits[0, -1].argmax()))
        else:
            self._speculative(out, past, max_new_tokens, eos, stats)
        stats.new_tokens = len(out)
        return out

    def _speculative(self, out: list[int], past: list[np.ndarray], budget: int,
                     eos: int | None, stats: GenerationStats) -> None:
        """Extend ``out`` (the prefill's token after ``past``) by draft-and-verify rounds."""
        assert self.draft_meta is not None
        draft_past_arrays = 2 * int(self.draft_meta["layers"])
        while len(out) < budget and out[-1] != eos:
            # no drafts past the budget: the last token is the full model's own
            k = min(self.draft_tokens, budget - len(out) - 1)
            # the first L layers compute the same K/V in the draft and in the full model
            drafts, token, small = [], out[-1], past[:draft_past_arrays]
            for _ in range(k):
                logits, small = self._run(self.draft, self.draft_meta["inputs"],
                                          np.array([[token]], dtype=np.int64), small)
                token = int(logits[0, -1].argmax())
                drafts.append(token)
            logits, present = self.forward(np.array([[out[-1], *drafts]], dtype=np.int64),
                                           past)
            verified = logits[0].argmax(-1).tolist()
            accepted = 0
            while accepted < k and drafts[accepted] == verified[accepted]:
                accepted += 1
            stats.verifications += 1
            stats.drafted += k
            stats.accepted += accepted
            for token in verified[:accepted + 1]:
                out.append(int(token))
                if token == eos or len(out) >= budget:
                    break
            # the cache keeps the verified block's input up to the last accepted draft
            length = past[0].shape[2] + accepted + 1
            past = [p[:, :, :length] for p in present]
