"""Activation checkpointing: keep only each block's input during the forward pass and recompute the block
in the backward pass, trading about one extra forward for activation memory that no longer grows with depth."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from llmkit.nn.block import Block, CrossAttentionBlock


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block of `model` (decoder, encoder or encoder-decoder) in the backward pass;
    returns how many blocks. Each block's forward is wrapped in place, so parameter names do not change."""
    blocks = [module for module in model.modules() if isinstance(module, (Block, CrossAttentionBlock))]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no transformer blocks to checkpoint")
    for block in blocks:
        if not getattr(block, "recomputed", False):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
            block.recomputed = True
    return len(blocks)
