"""What a training or evaluation step consumes: a batch is a dict of tensors (input_ids, labels, attention_mask,
document_ids, ...), and IGNORE_INDEX marks labels that count for nothing (prompt tokens, padding). Data code builds
batches; objectives in llmkit/train/ read them."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # label value that contributes nothing to the loss (prompt tokens, padding); PyTorch's default

Batch = dict[str, torch.Tensor]
