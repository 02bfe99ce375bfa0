"""The registry of weight formats: scheme name -> `Format` (quantize, dequantize, the group sizes it takes). Every
format maps a float weight (out, in) to a `QuantizedWeight` and back; the error bound of each is in its module's
docstring (integer.py, gguf_blocks.py, nf4.py), and tests/test_quant_formats.py runs one behaviour suite over FORMATS.

    scheme      bits/weight      group              bound on |w - w_hat|
    int8        8 + 32/in        row                s/2,  s = row absmax / 127
    int4        4 + 32/g         32 (64, 128)       s/2,  s = group absmax / 7
    int4_asym   4 + 40/g         32 (64, 128)       s/2,  s = group range / 15
    q8_0        8.5              32                 d (1/2 + 127 * 2^-11)
    q4_0        4.5              32                 |d| (1 + 8 * 2^-11)
    q4_1        5                32                 d (1/2 + 15 * 2^-11) + |m| 2^-11
    nf4         4.127            64 (flattened)     s max_gap/2 + c/254 (double-quantised scales)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmkit.errors import LlmkitError
from llmkit.quant import gguf_blocks, gguf_types, integer, nf4
from llmkit.quant.packed import QuantizedWeight, check_weight


@dataclass(frozen=True)
class Format:
    name: str
    quantize: Callable[[torch.Tensor, int | None], QuantizedWeight]  # (weight (out, in), group_size) -> packed
    dequantize: Callable[[QuantizedWeight, torch.dtype], torch.Tensor]  # (packed, dtype) -> weight (out, in)
    groups: tuple[int, ...]  # group sizes --group_size accepts (empty: the format fixes its group)
    description: str


NF4_FIELDS = ("codes", "absmax", "absmax_scale", "absmax_offset")


def quantize_nf4(weight: torch.Tensor, group_size: int | None = None) -> QuantizedWeight:
    """NF4 with double-quantised scales, blocks of `group_size` (default 64) over the row-major weight."""
    w = check_weight(weight, "nf4")
    block = nf4.DEFAULT_BLOCK_SIZE if group_size is None else group_size
    if block not in NF4_GROUPS:
        raise LlmkitError(f"nf4 --group_size must be one of {', '.join(map(str, NF4_GROUPS))}; got {group_size!r}")
    q = nf4.quantize_nf4(w, block_size=block, double_quant=True)
    return QuantizedWeight("nf4", q.shape, block, {name: getattr(q, name) for name in NF4_FIELDS})


def dequantize_nf4(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    q = nf4.NF4Tensor(**packed.tensors, shape=packed.shape, dtype=torch.float32, block_size=packed.group_size)
    return nf4.dequantize_nf4(q, dtype)


NF4_GROUPS = (32, 64, 128)

FORMATS: dict[str, Format] = {
    "int8": Format("int8", integer.quantize_int8, integer.dequantize_int8, (),
                   "int8 per output channel, symmetric"),
    "int4": Format("int4", integer.quantize_int4, integer.dequantize_int4, integer.INT4_GROUPS,
                   "int4 group-wise, symmetric"),
    "int4_asym": Format("int4_asym", integer.quantize_int4_asym, integer.dequantize_int4, integer.INT4_GROUPS,
                        "int4 group-wise with a zero point"),
    "q8_0": Format("q8_0", gguf_blocks.quantize_q8_0, gguf_blocks.dequantize_blocks, (),
                   "GGUF Q8_0 (llama.cpp blocks of 32)"),
    "q4_0": Format("q4_0", gguf_blocks.quantize_q4_0, gguf_blocks.dequantize_blocks, (),
                   "GGUF Q4_0 (llama.cpp blocks of 32)"),
    "q4_1": Format("q4_1", gguf_blocks.quantize_q4_1, gguf_blocks.dequantize_blocks, (),
                   "GGUF Q4_1 (llama.cpp blocks of 32, with a minimum)"),
    "nf4": Format("nf4", quantize_nf4, dequantize_nf4, NF4_GROUPS, "NF4 (QLoRA), double-quantised scales"),
}


# Formats that hold a GGUF file's tensors as stored (quant/gguf_types.py); QuantLinear runs them, `llmkit quantize`
# does not offer them (yet), so they stay out of FORMATS and its behaviour suite.
GGUF_FORMATS: dict[str, Format] = {
    **{name: Format(name, gguf_types.kquant_quantize(name), gguf_types.kquant_dequantize, (),
                    f"GGUF {name.upper()} (K-quant super-blocks of 256)")
       for name in ("q4_k", "q5_k", "q6_k")},
    **{name: Format(name, gguf_types.q5_quantize(name), gguf_types.q5_dequantize, (),
                    f"GGUF {name.upper()} (blocks of 32)") for name in gguf_types.Q5_TYPES},
    **{name: Format(name, gguf_types.half_quantize(name), gguf_types.half_dequantize, (),
                    f"{name} weight") for name in gguf_types.HALF_DTYPES},
}


def get_format(scheme: str) -> Format:
    if scheme in FORMATS:
        return FORMATS[scheme]
    if scheme in GGUF_FORMATS:
        return GGUF_FORMATS[scheme]
    raise LlmkitError(f"unknown --scheme {scheme!r}; choose one of {', '.join(FORMATS)}")


def quantize_weight(weight: torch.Tensor, scheme: str, group_size: int | None = None) -> QuantizedWeight:
    return get_format(scheme).quantize(weight, group_size)


def dequantize_weight(packed: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return get_format(packed.scheme).dequantize(packed, dtype)
