"""Quantisation: store weights in fewer bits. Formats (FORMATS: int8, int4, int4_asym, q8_0, q4_0, q4_1, nf4) map a
float weight to a packed `QuantizedWeight` and back; `QuantLinear` computes with the packed weight; `quantize` /
`dequantize` transform a model; `save_quantized` / `load_quantized` keep it quantized on disk. `nf4` also holds the
NF4 linear layer that QLoRA (Dettmers et al. 2023) fine-tunes on top of. `gptq` and `awq` are calibrated 4-bit
(model, calibration ids from `calibration_batches`) -> model, writing int4_asym layers."""

from llmkit.quant.awq import awq
from llmkit.quant.calibration import calibration_batches
from llmkit.quant.formats import FORMATS, dequantize_weight, quantize_weight
from llmkit.quant.gptq import gptq
from llmkit.quant.kquants import pack_gguf
from llmkit.quant.linear import QuantLinear, set_int8_prefill
from llmkit.quant.model import dequantize, is_quantized_dir, load_quantized, quantize, save_quantized
from llmkit.quant.packed import QuantizedWeight

__all__ = ["FORMATS", "QuantLinear", "QuantizedWeight", "awq", "calibration_batches", "dequantize", "dequantize_weight",
           "gptq", "is_quantized_dir", "load_quantized", "pack_gguf", "quantize", "quantize_weight", "save_quantized",
           "set_int8_prefill"]
