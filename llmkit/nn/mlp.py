"""Feed-forward layers: GELU MLP (GPT-2) and SwiGLU (Llama; Shazeer 2020, "GLU Variants")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.nn.linear import Linear


class GeluMLP(nn.Module):
    """y = down(gelu(up(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """y = down(silu(gate(x)) * up(x))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build_mlp(config: Config) -> nn.Module:
    """The block's feed-forward layer, chosen by `config.mlp` (a later MoE layer plugs in here)."""
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)
