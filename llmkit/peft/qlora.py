"""QLoRA (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"): LoRA on a base model whose linear
layers are frozen in 4-bit NormalFloat with double-quantised scales (llmkit.quant.nf4):

    y = dequant_NF4(W0) x + b + s B A x,    dequant in the compute dtype (bf16 or fp32), A and B trained

The base costs about 4.13 bits per linear weight instead of 16 or 32, gradients flow through the dequantised
weight into the adapters only. Applying it again to the same float base gives the same NF4 codes (quantisation is
deterministic), so an adapter file needs only A and B.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.peft.lora import LoraSettings, apply_lora
from llmkit.quant.nf4 import COMPUTE_DTYPES, DEFAULT_BLOCK_SIZE, DEFAULT_TARGETS, quantize_model_nf4


@dataclass
class QLoraSettings(LoraSettings):
    """LoRA's settings (rank, alpha, dropout, targets, ...) plus how the base is quantised to NF4."""

    double_quant: bool = True  # quantise the block scales again (0.127 instead of 0.5 bit per weight)
    compute_dtype: str = "float32"  # the base's matmuls: "float32" or "bfloat16" (QLoRA's choice on GPUs)
    block_size: int = DEFAULT_BLOCK_SIZE  # weights per absmax scale
    # Linear layers of the base stored in NF4 (the paper quantises them all); LoRA goes where `targets` says.
    nf4_targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.nf4_targets = (self.nf4_targets,) if isinstance(self.nf4_targets, str) else tuple(self.nf4_targets)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise LlmkitError(f"QLoRA compute_dtype={self.compute_dtype!r} is unknown; choose one of "
                              f"{', '.join(COMPUTE_DTYPES)}")
        if self.dora:
            raise LlmkitError("QLoRA with dora=True: DoRA needs the float weight of each layer, which NF4 does not "
                              "keep; use LoraSettings(dora=True) on an unquantised model, or QLoRA without DoRA")

    def lora(self) -> LoraSettings:
        """The LoRA part of these settings."""
        names = {field.name for field in dataclasses.fields(LoraSettings)}
        return LoraSettings(**{name: getattr(self, name) for name in names})


def apply_qlora(model: nn.Module, settings: QLoraSettings | None = None) -> nn.Module:
    """Quantise the base's linear layers to NF4, freeze everything, add trainable LoRA adapters (in place)."""
    settings = settings or QLoraSettings()
    quantize_model_nf4(model, settings.nf4_targets, settings.compute_dtype, settings.double_quant, settings.block_size)
    return apply_lora(model, settings.lora())
