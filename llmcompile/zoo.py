"""The architecture matrix: every causal-LM architecture of the installed transformers is either
in :data:`ZOO` (tested tiny, on every target and recipe, by ``tests/models/test_zoo_matrix.py``)
or in :data:`EXCLUDED` with the reason it is left out. ``tests`` fail on an architecture that
is in neither, so a transformers release that adds one is noticed.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXCLUDED", "ZOO", "ZOO_OVERRIDES", "causal_lm_architectures"]

#: dense decoder-only transformer LMs: plain Inductor compiles them fullgraph at tiny size
ZOO: tuple[str, ...] = (
    'apertus', 'apertus1p5_text', 'arcee', 'beam', 'biogpt', 'bitnet', 'bloom', 'codegen',
    'cohere', 'cohere2', 'cpmant', 'cwm', 'diffllama', 'doge', 'dory', 'ernie4_5', 'exaone',
    'exaone4', 'falcon', 'flint', 'fuyu', 'gemma', 'gemma2', 'gemma3_text',
    'gemma4_unified_text', 'glm', 'glm4', 'gpt-sw3', 'gpt2', 'gpt_bigcode', 'gpt_neox',
    'gpt_neox_japanese', 'gptj', 'granite', 'granite_swa', 'helium', 'hrm_text',
    'hunyuan_v1_dense', 'hyperclovax', 'internlm3', 'iquestcoder', 'jais2', 'lfm2', 'llama',
    'ministral', 'ministral3', 'mistral', 'modernbert-decoder', 'moshi', 'mpt', 'nanochat',
    'nemotron', 'olmo', 'olmo2', 'olmo3', 'openai-gpt', 'opt', 'persimmon', 'phi', 'phi3',
    'qwen2', 'qwen3', 'rwkv', 'seed_oss', 'smollm3', 'stablelm', 'starcoder2', 'vaultgemma',
    'xglm',
)

#: per-architecture config overrides beyond the generic tiny sizes
ZOO_OVERRIDES: dict[str, dict[str, Any]] = {}

EXCLUDED: dict[str, str] = {}


def causal_lm_architectures() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
