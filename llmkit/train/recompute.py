"""Activation checkpointing (Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost"): keep fewer tensors
for the backward pass and recompute the rest from what was kept.

Modes (`--train.activation_checkpointing`):
- `full`: keep only each block's input x and recompute the whole block in the backward: the saved activations no
  longer grow with the block's internals, for about one extra forward (~30% more compute).
- `attention`: recompute only each block's attention branch, attn(norm(x)) (with cross-attention in an
  encoder-decoder block); its saved tensors (normed input, q/k/v, attention output and statistics) become x alone.
- `mlp`: recompute only the MLP branch, mlp(norm(x)); a gated MLP saves the most per token (normed input, gate,
  up, act(gate), their product: ~4 x d_ff), so this drops most of a block's activations for a cheaper recompute
  than `full` (selective recomputation, Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", picks the cheap-to-recompute, expensive-to-store part).
- `none`: keep everything.

A branch is a method of the block (`attention_branch`, `mlp_branch`), wrapped in place, so parameter names do not
change. Recomputation replays the random state, so dropout draws the same mask twice: losses and gradients equal
the plain path's."""

from __future__ import annotations

from functools import partial

from torch import nn
from torch.utils.checkpoint import checkpoint

from llmkit.errors import LlmkitError
from llmkit.nn.block import Block, CrossAttentionBlock
from llmkit.train.settings import recompute_mode

# mode -> the block methods it recomputes ("forward": the whole block); a block lacking one (no cross-attention)
# skips it
RECOMPUTED_METHODS = {"full": ("forward",), "attention": ("attention_branch", "cross_attention_branch"),
                      "mlp": ("mlp_branch",)}


def enable_activation_checkpointing(model: nn.Module, mode: bool | str = "full") -> int:
    """Recompute the `mode` part (see the module docstring) of every transformer block of `model` (decoder,
    encoder or encoder-decoder) in the backward pass; returns how many blocks (0 for `none`).

    Raises:
        LlmkitError: an unknown mode, or blocks already recomputed in another mode.
        TypeError: `model` has no transformer blocks.
    """
    mode = recompute_mode(mode)
    if mode == "none":
        return 0
    blocks = [module for module in model.modules() if isinstance(module, (Block, CrossAttentionBlock))]
    if not blocks:
        raise TypeError(f"{type(model).__name__} has no transformer blocks to checkpoint")
    for block in blocks:
        done = getattr(block, "recomputed", None)
        if done == mode:
            continue
        if done is not None:
            raise LlmkitError(f"{type(model).__name__}'s blocks already recompute {done!r}; build the model again to "
                              f"checkpoint {mode!r} instead")
        for name in RECOMPUTED_METHODS[mode]:
            if hasattr(block, name):
                setattr(block, name, partial(checkpoint, getattr(block, name), use_reentrant=False))
        block.recomputed = mode
    return len(blocks)
