"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on a base model whose linear
layers are frozen in 4-bit NormalFloat with double-quantised scales (llmkit.quant.nf4):

    y = dequant_NF4(W0) x + b + s B A x,    dequant in the compute dtype (bf16 or fp32), A and B trained

The base costs about 4.13 bits per linear weight instead of 16 or 32, gradients flow through the dequantised
weight into the adapters only. Applying it again to the same float base gives the same NF4 codes (quantisation is
deterministic), so an adapter file needs only A and B.
"""

from __future__ import annotations

from torch import nn

from llmkit.peft.lora import apply_lora
from llmkit.peft.settings import QLoraSettings  # noqa: F401 (re-exported)
from llmkit.quant.nf4 import quantize_model_nf4


def apply_qlora(model: nn.Module, settings: QLoraSettings | None = None) -> nn.Module:
    """Quantise the base's linear layers to NF4, freeze everything, add trainable LoRA adapters (in place)."""
    settings = settings or QLoraSettings()
    quantize_model_nf4(model, settings.nf4_targets, settings.compute_dtype, settings.double_quant, settings.block_size)
    return apply_lora(model, settings.lora())
