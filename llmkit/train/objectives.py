"""Objectives: functions from (model, batch) to a scalar loss. The loop only ever calls one of these,
so pretraining, fine-tuning and the later objectives share every other part of training."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100  # label value that contributes nothing to the loss (prompt tokens, padding)

Batch = dict[str, torch.Tensor]
Objective = Callable[[nn.Module, Batch], torch.Tensor]


def causal_lm_batch(tokens: torch.Tensor) -> Batch:
    """Inputs and next-token labels from windows of T+1 tokens (B, T+1)."""
    return {"input_ids": tokens[:, :-1], "labels": tokens[:, 1:]}


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over labels that are not IGNORE_INDEX (computed in float32)."""
    logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
    return token_cross_entropy(logits, batch["labels"])


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T); float32 whatever the autocast dtype."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


OBJECTIVES: dict[str, Objective] = {"causal_lm": causal_lm_loss}
