"""Normalisation layers: RMSNorm (Llama family) and LayerNorm (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.nn import decode_kernels


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich, 2019).

    With an `offset` (Gemma: 1.0) the scale is (offset + weight), applied in float32 before rounding back."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # a scale of 1 to start with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (x.shape[-1],)
        if not torch.compiler.is_compiling() and self.weight.dtype == torch.float32 and decode_kernels.applies(x):
            return decode_kernels.rms_norm(x, self.weight, self.eps, self.offset)  # one op (inductor fuses its own)
        if self.offset:
            normed = F.rms_norm(x.float(), shape, eps=self.eps)
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, shape, self.weight, self.eps)  # one kernel instead of two (decode runs 61 norms)
        if x.device.type == "cpu":
            # torch's CPU kernel computes a bf16/fp16 rms_norm in float32 and rounds once: the same numbers as the
            # upcast below in half the ops (tests/test_decoder.py checks it)
            return F.rms_norm(x, shape, eps=self.eps) * self.weight
        return F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype) * self.weight


def build_norm(config: Config) -> nn.Module:
    """The block's normalisation layer, chosen by `config.norm`."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps, offset=config.norm_offset)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
