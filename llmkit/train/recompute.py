"""Activation checkpointing: keep only each block's input during the forward pass and recompute the block
in the backward pass, trading about one extra forward for activation memory that no longer grows with depth."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute every transformer block of `model` in the backward pass; returns how many blocks.

    The block's forward is wrapped in place, so parameter names (and checkpoints) do not change."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no `blocks` to checkpoint")
    for block in blocks:
        if not getattr(block, "recomputed", False):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)
            block.recomputed = True
    return len(blocks)
