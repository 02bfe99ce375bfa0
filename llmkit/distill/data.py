"""Text for a decoder student: documents tokenised in memory (EOS between them), split into training and held-out
tokens, and served to the loop as windows of seq_len + 1 tokens through the same SequenceStream / validation_batches
that pretraining reads its shards with (a distillation corpus is minutes of CPU work, so no shards on disk)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from llmkit.data.batch import Batch
from llmkit.data.shards import SequenceStream, validation_batches
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss


class TokensInMemory:
    """A token sequence with the reading interface of data.shards.TokenShards (`read`, `len`, `split`)."""

    def __init__(self, ids: np.ndarray, split: str, source: str = "the distillation text") -> None:
        self.ids, self.split, self.directory = np.asarray(ids, dtype=np.int64), split, source

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length)."""
        return self.ids[start:start + length]


def tokenize_documents(tokenizer: Tokenizer, documents: Sequence[str], max_tokens: int | None = None) -> np.ndarray:
    """Token ids of the documents in order, each followed by EOS (when the tokenizer has one), at most max_tokens."""
    ids: list[int] = []
    for document in documents:
        ids += tokenizer.encode(document, add_bos=False) + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return np.asarray(ids[:max_tokens], dtype=np.int64)


def split_held_out(ids: np.ndarray, held_out_fraction: float, seq_len: int) -> tuple[TokensInMemory, TokensInMemory]:
    """The last `held_out_fraction` of the tokens held out (validation), the rest for training."""
    n_held_out = int(len(ids) * held_out_fraction)
    if len(ids) - n_held_out < seq_len + 1 or n_held_out < seq_len + 1:
        raise LlmkitError(f"--data gives {len(ids):,} tokens: too few for a training and a held-out window of "
                          f"{seq_len + 1} tokens each; pass more text or a smaller --seq_len")
    return TokensInMemory(ids[:-n_held_out], "train"), TokensInMemory(ids[-n_held_out:], "held-out")


def window_batches(tokens: TokensInMemory, seq_len: int, seed: int) -> Callable[[int, int, int, int], Batch]:
    """The loop's batch source: shuffled windows (inputs, next-token labels) at a data position."""
    stream = SequenceStream(tokens, seq_len, seed=seed)

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> Batch:
        return causal_lm_batch(stream.batch(position, batch_size, rank, world_size))

    return batches


def held_out_batches(tokens: TokensInMemory, seq_len: int, batch_size: int, max_batches: int | None = None
                     ) -> Callable[[], Iterator[Batch]]:
    """The held-out windows in order, as the loop's eval_batches."""
    def batches() -> Iterator[Batch]:
        for window in validation_batches(tokens, seq_len, batch_size, max_batches=max_batches):
            yield causal_lm_batch(window)

    return batches


def held_out_perplexity(model: nn.Module, batches: Callable[[], Iterator[Batch]]) -> float:
    """exp(mean next-token cross-entropy) over every label token of the held-out windows (model left as it was)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches():
            terms = causal_lm_loss(model, batch)
            total, tokens = total + float(terms.total), tokens + int(terms.tokens)
    model.train(was_training)
    return math.exp(total / tokens)
