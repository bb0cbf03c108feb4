"""The architecture matrix: every causal-LM architecture of the installed transformers is either
in :data:`ZOO` (tested tiny, on every target and recipe, by ``tests/models/test_zoo_matrix.py``)
or in :data:`EXCLUDED` with the reason it is left out. A test fails on an architecture that is
in neither, so a transformers release that adds one is noticed.

How the lists were made (transformers 5.24, torch 2.13): every model type of
``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` was built with the generic tiny sizes of
:func:`llmcompile.tools.models.tiny_config` (2 layers, hidden 64), run eagerly, then captured
fullgraph by Dynamo; the architectures transformers 5.25 added (ergo, kolibri1_1, minicpm5_moe,
param2moe: all mixtures of experts) were classified the same way. 30 dense decoder-only
families are the matrix: 180 cells, about what CI can afford (45 minutes in all).
"""

from __future__ import annotations

from typing import Any

__all__ = ["EXCLUDED", "ZOO", "ZOO_OVERRIDES", "causal_lm_architectures"]

#: dense decoder-only transformer LMs, diverse in attention, norm, rotary and MLP spellings
ZOO: tuple[str, ...] = (
    "llama", "mistral", "ministral", "qwen2", "qwen3", "phi", "phi3", "gemma", "gemma2",
    "gemma3_text", "gpt2", "gptj", "gpt_neox", "gpt_bigcode", "bloom", "falcon", "opt", "mpt",
    "codegen", "stablelm", "starcoder2", "olmo", "olmo2", "cohere", "cohere2", "granite", "glm",
    "helium", "smollm3", "nemotron",
)

#: per-architecture config overrides beyond the generic tiny sizes
ZOO_OVERRIDES: dict[str, dict[str, Any]] = {}

_LEFT_OUT: dict[str, tuple[str, ...]] = {
    ("mixture of experts: the onnxruntime target cannot take transformers' expert kernel "
     "(custom op transformers.grouped_mm_fallback has no ONNX translation; a clear "
     "OnnxLoweringError and an Inductor fallback, measured on 27 of them), so no cell "
     "would pass on that target; the Inductor target alone is left out for CI time"): (
        "afmoe", "aria_text", "cohere2_moe", "deepseek_v4", "dots1", "ergo", "ernie4_5_moe",
        "exaone_moe", "flex_olmo", "glm4_moe", "granitemoe", "granitemoe_swa", "granitemoeshared",
        "hunyuan_v1_moe", "hy_v3", "jetmoe", "kolibri1", "laguna", "llama4_text", "mellum",
        "mimo_v2_flash", "minicpm5_moe", "minimax", "minimax_m2", "minimax_m3_vl_text", "mixtral",
        "olmoe", "param2moe", "phimoe", "qwen2_moe", "qwen3_moe", "sarvam_moe", "solar_open",
    ),
    ("dense decoder-only: captured fullgraph, left out of the matrix to keep CI under 45 minutes "
     "(same block types as the dense families in ZOO)"): (
        "apertus", "apertus1p5_text", "arcee", "beam", "biogpt", "bitnet", "cpmant", "cwm",
        "diffllama", "doge", "dory", "ernie4_5", "exaone", "exaone4", "flint", "fuyu",
        "gemma4_unified_text", "glm4", "gpt-sw3", "gpt_neox_japanese", "granite_swa", "hrm_text",
        "hunyuan_v1_dense", "hyperclovax", "internlm3", "iquestcoder", "jais2", "lfm2",
        "ministral3", "modernbert-decoder", "moshi", "nanochat", "olmo3", "openai-gpt",
        "persimmon", "seed_oss", "vaultgemma", "xglm",
    ),
    ("its tiny config does not build or run eagerly with the generic sizes (measured on "
     "transformers 5.24; kolibri1_1 on 5.25: its indexed-attention heads reject them)"): (
        "axk1", "axk2", "cohere_compass_text", "dbrx", "deepseek_v2", "deepseek_v3", "dots3_note",
        "dots3_note_text", "gemma3n", "gemma3n_text", "gemma4_assistant", "glm4_moe_lite",
        "gpt_neo", "kolibri1_1", "lfm2_moe", "longcat_flash", "mamba2", "minicpm3", "musicgen",
        "musicgen_melody", "plbart", "prophetnet", "qwen4_exp", "reformer", "sarvam_mla",
        "whisper", "xlnet", "xmod", "youtu", "zamba", "zamba2", "zaya",
    ),
    ("state-space / recurrent / linear-attention layers (alone or hybrid): outside the attention "
     "rule sets"): (
        "bailing_hybrid", "bamba", "falcon_h1", "falcon_mamba", "gpt_oss", "granitemoehybrid",
        "inkling_text", "jamba", "kimi_linear", "lara_mini", "lfm3", "mamba", "nemotron_h",
        "olmo_hybrid", "qwen3_5_moe_text", "qwen3_5_text", "qwen3_next", "qwen4_exp_text",
        "recurrent_gemma", "rwkv", "xlstm",
    ),
    ("needs architecture-specific sub-configs (vision/audio towers, fixed expert or vocabulary "
     "sizes): over 5M parameters at the generic tiny sizes"): (
        "bart", "bigbird_pegasus", "blenderbot", "blt", "deepseek_v32", "emu3", "gemma3", "gemma4",
        "gemma4_text", "gemma4_unified", "gemma4_unified_assistant", "git", "glm_moe_dsa",
        "got_ocr2", "hy_v4", "inkling2_loop_text", "inkling2_text", "llama4", "marian", "mbart",
        "mllama", "moss_transcribe_diarize", "mvp", "pegasus", "phi4_multimodal", "qwen3_5",
        "qwen3_5_moe", "roc_bert",
    ),
    ("an encoder (BERT-style bidirectional blocks) with a causal-LM head, not a decoder-only "
     "LLM"): (
        "bert", "bert-generation", "big_bird", "blenderbot-small", "camembert", "data2vec-text",
        "electra", "ernie", "megatron-bert", "rembert", "roberta", "roberta-prelayernorm",
        "roformer", "trocr", "xlm", "xlm-roberta", "xlm-roberta-xl",
    ),
    ("Dynamo cannot capture it fullgraph (graph break)"): (
        "ctrl",
    ),
}

#: architecture -> why it is not in the matrix
EXCLUDED: dict[str, str] = {arch: why for why, archs in _LEFT_OUT.items() for arch in archs}


def causal_lm_architectures() -> list[str]:
    """Every model type the installed transformers maps to a causal-LM class."""
    from .._compat import causal_lm_model_types

    return causal_lm_model_types()
