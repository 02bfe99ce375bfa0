"""Normalisation layers: RMSNorm (Llama family) and LayerNorm (GPT-2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 (Zhang & Sennrich, 2019).

    With an `offset` (Gemma: 1.0) the scale is (offset + weight), applied in float32 before rounding back."""

    def __init__(self, dim: int, eps: float = 1e-5, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # a scale of 1 to start with

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        if self.offset:
            return (normed * (self.offset + self.weight.float())).to(x.dtype)
        return normed.to(x.dtype) * self.weight


def build_norm(config: Config) -> nn.Module:
    """The block's normalisation layer, chosen by `config.norm`."""
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, eps=config.norm_eps, offset=config.norm_offset)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)
