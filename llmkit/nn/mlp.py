"""Feed-forward layers: GELU MLP (GPT-2), ReLU MLP (T5 v1.0), SwiGLU (Llama) and GeGLU (Gemma, T5 v1.1);
the gated ones are from Shazeer 2020, "GLU Variants Improve Transformer"."""

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


class GeGLU(nn.Module):
    """y = down(gelu(gate(x)) * up(x)); Gemma uses the tanh approximation of GELU."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.gate_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)
        self.approximate = config.gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.gate_proj(x), approximate=self.approximate) * self.up_proj(x))


class ReluMLP(nn.Module):
    """y = down(relu(up(x))): the original Transformer's and T5 v1.0's feed-forward layer."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.up_proj = Linear(config.d_model, config.d_ff, bias=config.mlp_bias)
        self.down_proj = Linear(config.d_ff, config.d_model, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.relu(self.up_proj(x)))


MLP_CLASSES = {"swiglu": SwiGLU, "gelu": GeluMLP, "geglu": GeGLU, "relu": ReluMLP}
