"""A pre-norm transformer block: x + attn(norm(x)), then x + ffn(norm(x)). It receives its parts,
so a LoRA linear, a mixture-of-experts FFN or another norm is a swap, not a subclass.

Gemma 2/3 wrap each sublayer in two norms ("sandwich"): x + norm_post(attn(norm_pre(x))), the same around the FFN;
the block then carries `post_attn_norm` and `post_mlp_norm`."""

from __future__ import annotations

import torch
from torch import nn

from llmkit.config import Config
from llmkit.nn.attention import Attention, AttentionContext
from llmkit.nn.mixers import build_mixer
from llmkit.nn.mlp import MLP_CLASSES
from llmkit.nn.moe import MoE
from llmkit.nn.norm import build_norm


class Block(nn.Module):
    def __init__(
        self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, mlp_norm: nn.Module,
        post_attn_norm: nn.Module | None = None, post_mlp_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.post_attn_norm = post_attn_norm  # Gemma's sandwich norms, on each sublayer's output; None: none
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.post_mlp_norm = post_mlp_norm
        # Slots for bottleneck adapters (llmkit/peft/adapters.py) on each sublayer's output, before the residual
        self.attn_adapter: nn.Module = nn.Identity()
        self.mlp_adapter: nn.Module = nn.Identity()

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        x = x + self.attention_branch(x, context)
        return x + self.mlp_branch(x)

    # Each residual branch is its own method so selective activation checkpointing (llmkit/train/recompute.py) can
    # recompute one of them, norm included, from the residual stream x alone.
    def attention_branch(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), context)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        return self.attn_adapter(h)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return self.mlp_adapter(h)


class PostNormBlock(Block):
    """Post-norm (original Transformer, BERT): x = norm(x + attn(x)), then x = norm(x + ffn(x)).
    Same parts and parameter names as `Block`; only where the norms sit differs."""

    def forward(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        x = self.attn_norm(x + self.attention_branch(x, context))
        return self.mlp_norm(x + self.mlp_branch(x))

    def attention_branch(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        return self.attn_adapter(self.attn(x, context))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_adapter(self.mlp(x))


def build_mlp(config: Config) -> nn.Module:
    """The block's feed-forward layer, chosen by `config.mlp`; a mixture of such layers when `config.n_experts`."""
    return MoE(config) if config.n_experts else MLP_CLASSES[config.mlp](config)


def build_block(config: Config, layer_index: int) -> Block:
    """The standard block for `config`: pre-norm, with sandwich norms when `config.post_norms` (Gemma 2/3), or
    post-norm when `config.post_norm` (BERT). Its `attn` is the layer's sequence mixer (`config.layer_mixers`):
    attention, or Hyena / RetNet / Mamba in its place."""
    if config.post_norm:
        return PostNormBlock(attn=Attention(config, layer_index), mlp=build_mlp(config), attn_norm=build_norm(config),
                             mlp_norm=build_norm(config))
    return Block(
        attn=build_mixer(config, layer_index),
        mlp=build_mlp(config),
        attn_norm=build_norm(config),
        mlp_norm=build_norm(config),
        post_attn_norm=build_norm(config) if config.post_norms else None,
        post_mlp_norm=build_norm(config) if config.post_norms else None,
    )


class CrossAttentionBlock(nn.Module):
    """The decoder block of an encoder-decoder (T5): x + self_attn(norm(x)), then x + cross_attn(norm(x)) over
    the encoder's keys/values, then x + ffn(norm(x))."""

    def __init__(
        self, attn: nn.Module, cross_attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module, cross_attn_norm: nn.Module,
        mlp_norm: nn.Module,
    ) -> None:
        super().__init__()
        self.attn_norm, self.attn = attn_norm, attn
        self.cross_attn_norm, self.cross_attn = cross_attn_norm, cross_attn
        self.mlp_norm, self.mlp = mlp_norm, mlp

    def forward(
        self, x: torch.Tensor, context: AttentionContext, cross_context: AttentionContext,
        encoder_keys_values: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        x = x + self.attention_branch(x, context)
        x = x + self.cross_attention_branch(x, cross_context, encoder_keys_values)
        return x + self.mlp_branch(x)

    def attention_branch(self, x: torch.Tensor, context: AttentionContext) -> torch.Tensor:
        return self.attn(self.attn_norm(x), context)

    def cross_attention_branch(
        self, x: torch.Tensor, cross_context: AttentionContext, encoder_keys_values: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        return self.cross_attn(self.cross_attn_norm(x), cross_context, encoder_keys_values)

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.mlp_norm(x))


def build_cross_attention_block(config: Config, layer_index: int) -> CrossAttentionBlock:
    """A decoder block with cross-attention for `config` (pre-norm)."""
    return CrossAttentionBlock(
        attn=Attention(config, layer_index),
        cross_attn=Attention(config, layer_index),
        mlp=build_mlp(config),
        attn_norm=build_norm(config),
        cross_attn_norm=build_norm(config),
        mlp_norm=build_norm(config),
    )
