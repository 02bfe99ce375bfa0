"""Distilling a sentence encoder (all-MiniLM-L6-v2 -> a 3-layer student): the student's pooled sentence embedding
is pulled to the teacher's (Reimers & Gurevych 2020, "Making Monolingual Sentence Embeddings Multilingual using
Knowledge Distillation": MSE to the teacher's embeddings; or 1 - cos, DistilBERT's cosine loss), optionally with
DistilBERT's hidden-state loss on every real token of the last layer.

The teacher's embeddings of the training texts are computed once (`embed_texts`, no gradient) and ride in each batch
(`teacher_embeddings`), so the teacher costs one pass over the data whatever the number of steps; only the
hidden-state loss needs the teacher again per batch. The loop counts one label per sentence (labels (B, 1)), so the
loss it reports is the mean per sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from llmkit.data.batch import Batch
from llmkit.distill.losses import hidden_state_loss
from llmkit.distill.objective import freeze
from llmkit.distill.settings import HiddenLoss
from llmkit.errors import LlmkitError
from llmkit.models.encoder import SentenceSettings, pool
from llmkit.train.objectives import TokenLoss, label_tokens

TEACHER_EMBEDDINGS = "teacher_embeddings"  # batch key: the teacher's (B, C) sentence embeddings


def encoder_body(model: nn.Module) -> nn.Module:
    """The Encoder inside a MaskedLM or classifier (its hidden states are what sentences are pooled from)."""
    return getattr(model, "encoder", model)


class SentenceDistillation:
    """The objective: embedding loss between the student's and the teacher's pooled sentence vectors, plus
    `hidden_weight` x the hidden-state loss averaged over each sentence's real tokens (needs a same-width student)."""

    loss_label = "embedding distillation loss (per sentence)"

    def __init__(self, teacher: nn.Module | None, sentence: SentenceSettings, embedding_loss: HiddenLoss = "cosine",
                 hidden_weight: float = 0.0, hidden_loss: HiddenLoss = "cosine") -> None:
        if hidden_weight > 0 and teacher is None:
            raise LlmkitError("the hidden-state loss (--hidden_weight above 0) needs the teacher model itself")
        self.teacher = freeze(encoder_body(teacher)) if teacher is not None else None
        self.sentence, self.embedding_loss = sentence, embedding_loss
        self.hidden_weight, self.hidden_loss = hidden_weight, hidden_loss

    def __call__(self, model: nn.Module, batch: Batch) -> TokenLoss:
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = model(input_ids, mask)  # (B, T, C)
        if TEACHER_EMBEDDINGS in batch:
            target = batch[TEACHER_EMBEDDINGS]
        else:
            with torch.no_grad():
                target = pool(self.teacher(input_ids, mask), mask, self.sentence)
        per_sentence = hidden_state_loss(pool(hidden, mask, self.sentence), target, self.embedding_loss)  # (B,)
        metrics = {"embedding": per_sentence.detach().sum()}
        if self.hidden_weight > 0:
            with torch.no_grad():
                teacher_hidden = self.teacher(input_ids, mask)  # (B, T, C)
            real = mask.bool()
            per_token = hidden_state_loss(hidden[real], teacher_hidden[real], self.hidden_loss)  # (N,)
            sentence_of = real.nonzero()[:, 0]  # (N,) the row of each real token
            per_row = torch.zeros(len(mask), device=hidden.device).index_add(0, sentence_of, per_token) / real.sum(1)
            per_sentence = per_sentence + self.hidden_weight * per_row
            metrics["hidden"] = per_row.detach().sum()
        return TokenLoss(per_sentence.sum(), label_tokens(batch), metrics=metrics)


def padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows padded on the right: ids (B, T) and attention mask (B, T) (1 = real token)."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, :len(row)], mask[k, :len(row)] = torch.tensor(row), 1
    return ids, mask


def sentence_batches(rows: Sequence[Sequence[int]], pad_id: int, seed: int,
                     teacher_embeddings: torch.Tensor | None = None) -> Callable[[int, int, int, int], Batch]:
    """The loop's batch source over tokenised sentences: a fresh seeded permutation per epoch, each batch padded to
    its longest row, with one label per sentence and the teacher's embeddings of its rows when given."""
    if teacher_embeddings is not None and len(teacher_embeddings) != len(rows):
        raise LlmkitError(f"{len(teacher_embeddings)} teacher embeddings for {len(rows)} sentences; compute them over "
                          "the same texts")

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> Batch:
        first = position + rank * batch_size
        picked = []
        for index in range(first, first + batch_size):
            epoch, offset = divmod(index, len(rows))
            picked.append(int(np.random.default_rng(seed + epoch).permutation(len(rows))[offset]))
        ids, mask = padded([rows[index] for index in picked], pad_id)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(picked), 1, dtype=torch.long)}
        if teacher_embeddings is not None:
            batch[TEACHER_EMBEDDINGS] = teacher_embeddings[picked]
        return batch

    return batches
