"""Weight formats that exist to hold a GGUF file's tensors as the file stores them (quant/gguf_load.py), beside the
ones `llmkit quantize --scheme` offers (formats.FORMATS):

    scheme   bytes per block of values      how QuantLinear computes with it (few rows; more: dequantize, F.linear)
    q4_k     144 per 256 (4.5 bits/weight)  llmkit's int8-activation kernel on these bytes (quant/native.py);
    q5_k     176 per 256 (5.5)              without a compiler: aten's int4 kernel (q4_k exactly at group 32,
    q6_k     210 per 256 (6.5625)           q5_* as two 4-bit pieces: quant/affine.py, tinygemm.py); q6_k
    q5_0      22 per 32  (5.5)              then dequantizes per call
    q5_1      24 per 32  (6)
    f16, bf16 2 per value                   llmkit's float kernel (fallback: F.linear in the half type)

The K-quant and Q5 bytes are kept exactly as in the file, tensors {"blocks": uint8 (out, in / block * bytes)}, one
row of blocks per output row (the layout ggml uses); `dequantize` is bit-exact with gguf.quants.dequantize (the
kquants module tests that). A QuantLinear on llmkit's kernels holds these bytes as they are; on aten's int4 kernel it
holds the codes in that kernel's layout and the scale bytes beside them, and rebuilds these bytes on request.
f16/bf16 keep the half-precision matrix {"weight"}.
Each format's quantizer is the reference one (kquants.quantize_*, gguf.quants.quantize, a cast), so the registry's
quantize -> dequantize contract holds; these schemes are not offered by `llmkit quantize` yet.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf import quants as gguf_quants

from llmkit.errors import LlmkitError
from llmkit.quant import kquants
from llmkit.quant.packed import QuantizedWeight, check_weight

Q5_BLOCK = 32
Q5_TYPES = {"q5_0": GGMLQuantizationType.Q5_0, "q5_1": GGMLQuantizationType.Q5_1}
HALF_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}


def _no_group(scheme: str, group_size: int | None, block: int | None) -> None:
    if group_size not in (None, block):
        raise LlmkitError(f"{scheme} has a fixed block of {block} weights: --group_size {group_size} does not apply; "
                          "leave it out")


def kquant_quantize(scheme: str):  # noqa: ANN201 (a Format.quantize)
    def quantize(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
        _no_group(scheme, group_size, kquants.QK_K)
        w = check_weight(weight, scheme)
        blocks = torch.from_numpy(kquants.QUANTIZE[scheme](w.numpy()))
        return QuantizedWeight(scheme, tuple(w.shape), kquants.QK_K, {"blocks": blocks})
    return quantize


def kquant_dequantize(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w_hat (out, in) of K-quant blocks, as ggml computes it (fp32), then `dtype`."""
    values = kquants.DEQUANTIZE[packed.scheme](packed.tensors["blocks"].cpu().numpy(), packed.shape)
    return torch.from_numpy(values).to(device=packed.tensors["blocks"].device, dtype=dtype)


def q5_quantize(scheme: str):  # noqa: ANN201 (a Format.quantize)
    def quantize(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
        _no_group(scheme, group_size, Q5_BLOCK)
        w = check_weight(weight, scheme)
        if w.shape[1] % Q5_BLOCK:
            raise LlmkitError(f"{scheme} needs in_features divisible by {Q5_BLOCK}; this weight has {w.shape[1]}")
        blocks = torch.from_numpy(np.ascontiguousarray(gguf_quants.quantize(w.numpy(), Q5_TYPES[scheme])))
        return QuantizedWeight(scheme, tuple(w.shape), Q5_BLOCK, {"blocks": blocks})
    return quantize


def q5_dequantize(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    data = packed.tensors["blocks"]
    values = gguf_quants.dequantize(data.cpu().numpy(), Q5_TYPES[packed.scheme]).reshape(packed.shape)
    return torch.from_numpy(values).to(device=data.device, dtype=dtype)


def half_quantize(scheme: str):  # noqa: ANN201 (a Format.quantize)
    def quantize(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
        _no_group(scheme, group_size, None)
        w = check_weight(weight, scheme)
        return QuantizedWeight(scheme, tuple(w.shape), None, {"weight": w.to(HALF_DTYPES[scheme])})
    return quantize


def half_dequantize(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return packed.tensors["weight"].to(dtype)
