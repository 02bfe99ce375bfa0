"""Feed-forward layers: GELU MLP (GPT-2), ReLU MLP (T5 v1.0), SwiGLU (Llama) and GeGLU (Gemma, T5 v1.1);
the gated ones are from Shazeer 2020, "GLU Variants Improve Transformer"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.config import Config
from llmkit.nn.fused import fused_product
from llmkit.nn.linear import Linear


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, exact ("none"), tanh-approximated ("tanh", GPT-2) or CLIP's "quick" x * sigmoid(1.702 x)."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate=approximate)


class GeluMLP(nn.Module):
    """y = down(gelu(up(x)))."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gelu(self.up_proj(x), self.approximate))


class SwiGLU(nn.Module):
    """y = down(silu(gate(x)) * up(x)); `llmkit.nn.fused.fuse_projections` can join gate/up into one product."""

    FUSED_PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = gate_and_up(self, x)
        return self.down_proj(F.silu(gate) * up)


class GeGLU(nn.Module):
    """y = down(gelu(gate(x)) * up(x)); Gemma uses the tanh approximation of GELU. Fusable as SwiGLU."""

    FUSED_PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = gate_and_up(self, x)
        return self.down_proj(gelu(gate, self.approximate) * up)


class ReluMLP(nn.Module):
    """y = down(relu(up(x))): the original Transformer's and T5 v1.0's feed-forward layer."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)))


def gate_and_up(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated MLP's gate(x) and up(x) (..., d_ff): one product where `fuse_projections` joined them."""
    fused = fused_product(mlp, x)  # (..., 2 d_ff) or None
    if fused is None:
        return mlp.gate_proj(x), mlp.up_proj(x)
    gate, up = fused.chunk(2, dim=-1)
    return gate, up


MLP_CLASSES = {"swiglu": SwiGLU, "gelu": GeluMLP, "geglu": GeGLU, "relu": ReluMLP}
