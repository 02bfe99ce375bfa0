"""What a training or evaluation step consumes: a batch is a dict of tensors (input_ids, labels, attention_mask,
document_ids, ...; a speech model's batch has input_features (B, n_mels, frames) in place of input_ids; images:
pixel_values (B, C, H, W) with labels (B,) of classes or, for CLIP, of each image's caption row), and IGNORE_INDEX
marks labels that count for nothing (prompt tokens, padding). Data code builds batches; objectives in llmkit/train/
read them."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that contributes nothing to the loss (prompt tokens, padding); PyTorch's default

Batch = dict[str, torch.Tensor]


def input_units(batch: Batch) -> int:
    """What a batch's throughput counts: its images when it has pixel_values (B, C, H, W), else its tokens: the
    input ids (B, T) -> B * T, or for a speech batch (input_features, no ids) its target positions."""
    if "pixel_values" in batch:
        return int(batch["pixel_values"].shape[0])
    return (batch["input_ids"] if "input_ids" in batch else batch["labels"]).numel()
