"""What a training or evaluation step consumes: a batch is a dict of tensors (input_ids, labels, attention_mask,
document_ids, ...; a speech model's batch has input_features (B, n_mels, frames) in place of input_ids), and
IGNORE_INDEX marks labels that count for nothing (prompt tokens, padding). Data code builds batches; objectives in
llmkit/train/ read them."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that contributes nothing to the loss (prompt tokens, padding); PyTorch's default

Batch = dict[str, torch.Tensor]


def batch_tokens(batch: Batch) -> int:
    """Tokens a batch feeds the model, for throughput figures: its input ids, or for a speech batch (input_features,
    no ids) its target positions."""
    return (batch["input_ids"] if "input_ids" in batch else batch["labels"]).numel()
