"""Batches of SFT examples for the training loop, by padding or by packing.

Each example is fed whole and its labels are shifted to next-token targets (labels[1:] then IGNORE_INDEX: the
final EOS predicts nothing), so the loss covers exactly the completion tokens.

- padding: one example per row, right-padded; `attention_mask` (B, T) hides the padding, whose labels are ignored.
- packing: short examples are laid end to end in rows of `max_length` tokens (greedily, in dataset order);
  `document_ids` (B, T) tells the Decoder where each one starts, so attention is block-diagonal causal and
  positions restart at every example: a packed row computes what each example would alone, without the padding.

Like llmkit.data.shards.SequenceStream, the data state is one integer `position` (rows consumed, across ranks);
epoch e visits the rows in default_rng(seed + e)'s permutation, so a resumed run continues with the same batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from llmkit.data.batch import IGNORE_INDEX, Batch
from llmkit.data.sft import SFTExample
from llmkit.errors import LlmkitError

PAD_DOCUMENT = -1  # document id of the padding at the end of a packed row (its own block; its labels are ignored)


def pack_examples(examples: Sequence[SFTExample], max_length: int) -> list[list[int]]:
    """Rows of example indices, in dataset order: an example joins the current row while the row stays within
    `max_length` tokens, else it starts a new row."""
    rows: list[list[int]] = []
    used = max_length + 1  # forces a new row for the first example
    for index, example in enumerate(examples):
        length = len(example.input_ids)
        if length > max_length:
            raise LlmkitError(f"example {index} has {length} tokens, more than max_length={max_length}: tokenize with "
                              "the same max_length (tokenize_records truncates or drops longer ones)")
        if used + length > max_length:
            rows.append([])
            used = 0
        rows[-1].append(index)
        used += length
    return rows


def shifted_labels(example: SFTExample) -> list[int]:
    """Next-token targets aligned with input_ids: target t is label t + 1; the last token predicts nothing."""
    return example.labels[1:] + [IGNORE_INDEX]


class SFTBatches:
    """The loop's batch source over SFT examples: `batches(position, batch_size, rank, world_size)` -> Batch."""

    def __init__(
        self,
        examples: Sequence[SFTExample],
        batch_size: int,
        seed: int = 0,
        packing: bool = False,
        max_length: int | None = None,
        pad_id: int = 0,
        shuffle: bool = True,
    ) -> None:
        if not examples:
            raise LlmkitError("no SFT examples to batch: load some with llmkit.data.sft.load_sft_dataset")
        longest = max(len(example.input_ids) for example in examples)
        if max_length is not None and max_length < longest:
            raise LlmkitError(f"max_length={max_length} is shorter than the longest example ({longest} tokens): "
                              "tokenize with the same max_length")
        self.examples, self.seed, self.packing, self.pad_id, self.shuffle = examples, seed, packing, pad_id, shuffle
        self.max_length = max_length
        if packing:
            self.max_length = max_length or longest
            self.rows = pack_examples(examples, self.max_length)
        else:
            self.rows = [[index] for index in range(len(examples))]
        if batch_size < 1 or len(self.rows) < batch_size:
            what = "packed rows" if packing else "examples"
            raise LlmkitError(f"batch_size={batch_size} needs at least that many {what}; there are {len(self.rows)}: "
                              "use a smaller batch_size or more data")
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """Rows per epoch (examples, or packed rows)."""
        return len(self.rows)

    @property
    def fill(self) -> float:
        """Share of the row tokens that are real (1.0 = no padding; unpacked rows are counted at the longest
        example's width, the most a padded batch can be); packing raises it."""
        real = sum(len(example.input_ids) for example in self.examples)
        if self.packing:
            return real / (len(self.rows) * self.max_length)
        return real / (len(self.rows) * max(len(example.input_ids) for example in self.examples))

    def row_at(self, position: int) -> list[int]:
        """Example indices of the row at a global position (epoch position // rows, permuted by seed + epoch)."""
        if position < 0:
            raise LlmkitError(f"position {position} is negative: it counts rows consumed since the start of training")
        epoch, offset = divmod(position, len(self.rows))
        if self.shuffle:
            if epoch not in self._permutations:
                self._permutations = {epoch: np.random.default_rng(self.seed + epoch).permutation(len(self.rows))}
            offset = int(self._permutations[epoch][offset])
        return self.rows[offset]

    def __call__(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Batch:
        """This rank's slice of the global batch at `position`: rows [position + rank * batch_size, ...)."""
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise LlmkitError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        first = position + rank * batch_size
        return self.collate([self.row_at(first + k) for k in range(batch_size)])

    def collate(self, rows: Sequence[Sequence[int]]) -> Batch:
        """A Batch of rows of example indices: padded (attention_mask) or packed (document_ids)."""
        if self.packing:
            return packed_batch([[self.examples[index] for index in row] for row in rows], self.max_length, self.pad_id)
        return padded_batch([self.examples[row[0]] for row in rows], self.pad_id, self.max_length)


def padded_batch(examples: Sequence[SFTExample], pad_id: int = 0, length: int | None = None) -> Batch:
    """Right-padded input_ids, shifted labels (IGNORE_INDEX on padding) and attention_mask, each (B, T); T is the
    longest example, or `length` when given (static shapes, e.g. for torch.compile)."""
    width = length or max(len(example.input_ids) for example in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        size = len(example.input_ids)
        input_ids[row, :size] = torch.tensor(example.input_ids)
        labels[row, :size] = torch.tensor(shifted_labels(example))
        attention_mask[row, :size] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def packed_batch(rows: Sequence[Sequence[SFTExample]], length: int, pad_id: int = 0) -> Batch:
    """Rows of examples laid end to end: input_ids, shifted labels and document_ids (example k of a row has id k,
    trailing padding PAD_DOCUMENT), each (B, length)."""
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    document_ids = torch.full((len(rows), length), PAD_DOCUMENT, dtype=torch.long)
    for row, examples in enumerate(rows):
        start = 0
        for document, example in enumerate(examples):
            end = start + len(example.input_ids)
            if end > length:
                raise LlmkitError(f"packed row {row} needs {end} tokens, more than its length {length}")
            input_ids[row, start:end] = torch.tensor(example.input_ids)
            labels[row, start:end] = torch.tensor(shifted_labels(example))
            document_ids[row, start:end] = document
            start = end
    return {"input_ids": input_ids, "labels": labels, "document_ids": document_ids}


def sft_batches(
    examples: Sequence[SFTExample],
    batch_size: int,
    seed: int = 0,
    packing: bool = False,
    max_length: int | None = None,
    pad_id: int = 0,
) -> SFTBatches:
    """The training loop's batch source over SFT examples (see SFTBatches); `batch_size` checks there is enough
    data for one batch. With packing, rows are `max_length` tokens (default: the longest example)."""
    return SFTBatches(examples, batch_size, seed, packing, max_length, pad_id)


def sft_validation_batches(
    examples: Sequence[SFTExample],
    batch_size: int,
    packing: bool = False,
    max_length: int | None = None,
    pad_id: int = 0,
) -> Callable[[], Iterator[Batch]]:
    """The loop's `eval_batches`: every row once, in order, batch_size at a time (the last batch may be smaller)."""
    if batch_size < 1:
        raise LlmkitError(f"batch_size={batch_size} must be at least 1")
    source = SFTBatches(examples, 1, packing=packing, max_length=max_length, pad_id=pad_id, shuffle=False)

    def batches() -> Iterator[Batch]:
        for first in range(0, len(source), batch_size):
            yield source.collate(source.rows[first : first + batch_size])

    return batches
