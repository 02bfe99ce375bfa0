"""A pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)). It receives its parts,
so a LoRA linear, a mixture-of-experts FFN or another norm is a swap, not a subclass."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.config import Config
from llmkit.nn.attention import Attention, AttentionContext
from llmkit.nn.mlp import build_mlp
from llmkit.nn.norm import build_norm


class Block(nn.Module):
    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), context)
        return x + self.mlp(self.mlp_norm(x))


def build_block(config: Config, layer_index: int) -> Block:
    """The standard decoder block for `config`."""
    return Block(
        attn=Attention(config, layer_index),
        mlp=build_mlp(config),
        attn_norm=build_norm(config),
        mlp_norm=build_norm(config),
    )
