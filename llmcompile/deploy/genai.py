"""``genai_config.json`` for a file written by ``llmcompile.export``, so that ONNX Runtime GenAI
(``onnxruntime_genai.Model(folder)``, its C / C++ / C# / Python runtime) runs it.

The file's I/O is what GenAI's generic decoder-only model (``type = "decoder"``) feeds:
``input_ids``, ``position_ids``, ``past_key_values.%d.key/value`` in, ``logits`` and
``present.%d.key/value`` out. The past / present buffers are not shared
(``past_present_share_buffer = false``): the file's ``GroupQueryAttention`` appends the step's
keys and values to the past it is given. The draft of an early-exit export is not described
(GenAI would decode with the full model only). The tokenizer files GenAI reads
(``tokenizer.json``, ``tokenizer_config.json``) are those ``llmcompile.export`` saves beside the
file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..ops.onnx import CUDA

__all__ = ["CONFIG", "context_length", "genai_config", "text_config", "write_genai_config"]

CONFIG = "genai_config.json"
#: GenAI's default context when the model's config names none
DEFAULT_CONTEXT = 2048


def _token(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def text_config(config):
    """The decoder's config of a (possibly multimodal) transformers config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def context_length(config) -> int:
    """The longest sequence the model takes (``max_position_embeddings``; GenAI's default)."""
    return int(getattr(text_config(config), "max_position_embeddings", None) or DEFAULT_CONTEXT)


def genai_config(module, sidecar: dict[str, Any], filename: str, provider: str) -> dict:
    """The ``genai_config.json`` content for ``filename`` (exported from ``module``)."""
    text = text_config(module.config)
    context = context_length(module.config)
    eos = _token(sidecar.get("eos_token_id"))
    pad = getattr(text, "pad_token_id", None)
    generation = getattr(module, "generation_config", None)
    bos = getattr(generation, "bos_token_id", None) or getattr(text, "bos_token_id", None)
    options = [{"cuda": {}}] if provider == CUDA else []
    return {
        "model": {
            "type": "decoder",
            "bos_token_id": _token(bos) if bos is not None else 0,
            "eos_token_id": eos if eos is not None else -1,
            "pad_token_id": _token(pad) if pad is not None else (eos if eos is not None
                                                                 else 0),
            "context_length": int(context),
            "vocab_size": int(sidecar["vocab_size"]),
            "decoder": {
                "filename": filename,
                "session_options": {"log_id": "llmcompile", "provider_options": options},
                "head_size": int(sidecar["head_dim"]),
                "hidden_size": int(text.hidden_size),
                "num_attention_heads": int(text.num_attention_heads),
                "num_hidden_layers": int(sidecar["layers"]),
                "num_key_value_heads": int(sidecar["kv_heads"]),
                "inputs": {"input_ids": "input_ids", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {
            "do_sample": False, "num_beams": 1, "num_return_sequences": 1,
            "max_length": int(context), "min_length": 0,
            "past_present_share_buffer": False,
            "temperature": 1.0, "top_k": 1, "top_p": 1.0, "repetition_penalty": 1.0,
            "length_penalty": 1.0, "no_repeat_ngram_size": 0, "diversity_penalty": 0.0,
            "early_stopping": True,
        },
    }


def write_genai_config(path: Path, module, sidecar: dict[str, Any], provider: str) -> Path:
    """Write ``genai_config.json`` beside ``path`` (the exported ``.onnx`` file)."""
    out = path.with_name(CONFIG)
    out.write_text(json.dumps(genai_config(module, sidecar, path.name, provider), indent=2))
    return out
