"""Quantization math (int8 per-channel, int4 grouped; AWQ scale search, GPTQ error feedback;
CPU and ``MatMulNBits`` packings: ``formats``) and calibration (``calibrate``), used by
``passes/quantize.py``."""

from .formats import (
    NBITS_INT8_BLOCK,
    Int4Weight,
    awq_search,
    dequantize_int4,
    gptq_int4,
    int4_nbits,
    int8_nbits,
    quantize_int4,
    quantize_int8,
)

__all__ = ["NBITS_INT8_BLOCK", "Int4Weight", "awq_search", "dequantize_int4", "gptq_int4",
           "int4_nbits", "int8_nbits", "quantize_int4", "quantize_int8"]
