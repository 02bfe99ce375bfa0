"""Stream training windows from token shards without loading the corpus: each shard is memory-mapped read-only.

The token stream of a split is cut into non-overlapping windows of seq_len + 1 tokens (the extra one is the last
target), window i starting at token i * seq_len. Training visits them in an endless run of epochs, each a fresh
permutation drawn from default_rng(seed + epoch), so a run's whole data state is one integer: `position`, the number
of samples consumed so far (across all ranks). Rank r of a global batch takes its r-th contiguous slice, so a global
batch holds the same samples for any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llmkit.errors import LlmkitError

PERMUTATIONS_KEPT = 2  # epochs whose permutation stays cached (a batch can straddle two)


class TokenShards:
    """The tokens of one split (train or val) of a prepared directory, as one contiguous read-only sequence."""

    def __init__(self, directory: str | Path, split: str = "train") -> None:
        from llmkit.data.prepare import load_manifest

        self.directory, self.split = Path(directory), split
        self.manifest = load_manifest(directory)
        splits = self.manifest["splits"]
        if split not in splits:
            raise LlmkitError(
                f"{self.directory} has no '{split}' split (it has: {', '.join(splits)}): "
                "run `llmkit prepare` with --val_fraction above 0 for a validation split"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eos_id: int = self.manifest["eos_id"]
        files = [entry for entry in splits[split]["files"] if entry["n_tokens"] > 0]
        self.shards = [
            np.memmap(self.directory / entry["name"], dtype=self.dtype, mode="r", shape=(entry["n_tokens"],))
            for entry in files
        ]
        lengths = np.array([len(shard) for shard in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)  # first token of each shard
        self.n_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return self.n_tokens

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) in the stored dtype, read across shard boundaries."""
        if start < 0 or length < 0 or start + length > self.n_tokens:
            raise LlmkitError(
                f"tokens [{start:,}, {start + length:,}) are outside the {self.split} split's {self.n_tokens:,} tokens"
            )
        pieces = []
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        while length > 0:
            offset = start - int(self.starts[shard])
            take = min(length, len(self.shards[shard]) - offset)
            pieces.append(self.shards[shard][offset : offset + take])
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)


class SequenceStream:
    """Fixed-length training samples (seq_len + 1 tokens) over a TokenShards, in a seeded order per epoch."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int = 0, shuffle: bool = True) -> None:
        if seq_len < 1:
            raise LlmkitError(f"seq_len {seq_len} must be at least 1")
        self.n_samples = _sample_count(shards, seq_len)
        self.shards, self.seq_len, self.seed, self.shuffle = shards, seq_len, seed, shuffle
        self._permutations: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_samples

    def sample(self, index: int) -> np.ndarray:
        """Sample `index`: tokens [index * seq_len, index * seq_len + seq_len + 1)."""
        if not 0 <= index < self.n_samples:
            raise LlmkitError(f"sample {index} is outside 0..{self.n_samples - 1}")
        return self.shards.read(index * self.seq_len, self.seq_len + 1)

    def epoch_of(self, position: int) -> int:
        """The epoch a global position falls in (position counts samples across epochs)."""
        return _checked(position) // self.n_samples

    def global_sample(self, position: int) -> int:
        """The sample index at a global position: entry position % n_samples of epoch position // n_samples."""
        epoch, offset = divmod(_checked(position), self.n_samples)
        if not self.shuffle:
            return offset
        return int(self._permutation(epoch)[offset])

    def batch(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
        """This rank's (batch_size, seq_len + 1) int64 slice of the global batch at `position`.

        The global batch is positions [position, position + batch_size * world_size); rank r takes
        [position + r * batch_size, position + (r + 1) * batch_size). Advance `position` by batch_size * world_size.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise LlmkitError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        first = _checked(position) + rank * batch_size
        rows = [self.shards.read(self.global_sample(first + k) * self.seq_len, self.seq_len + 1) for k in range(batch_size)]
        return torch.from_numpy(np.stack(rows).astype(np.int64))  # (batch_size, seq_len + 1)

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            while len(self._permutations) >= PERMUTATIONS_KEPT:
                self._permutations.pop(next(iter(self._permutations)))  # the oldest epoch
            self._permutations[epoch] = np.random.default_rng(self.seed + epoch).permutation(self.n_samples)
        return self._permutations[epoch]


def validation_batches(
    shards: TokenShards, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[torch.Tensor]:
    """Windows 0, 1, 2, ... in order (no shuffling), batch_size at a time (the last batch may be smaller), as int64."""
    if batch_size < 1:
        raise LlmkitError(f"batch_size {batch_size} must be at least 1")
    n_samples = _sample_count(shards, seq_len)
    n_batches = -(-n_samples // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for batch_index in range(n_batches):
        first = batch_index * batch_size
        count = min(batch_size, n_samples - first)
        # consecutive windows share their boundary token: read the span once, then take overlapping rows
        span = shards.read(first * seq_len, count * seq_len + 1).astype(np.int64)
        rows = np.lib.stride_tricks.sliding_window_view(span, seq_len + 1)[::seq_len]  # (count, seq_len + 1)
        yield torch.from_numpy(np.ascontiguousarray(rows))


def _sample_count(shards: TokenShards, seq_len: int) -> int:
    if len(shards) < seq_len + 1:
        raise LlmkitError(
            f"the {shards.split} split of {shards.directory} has {len(shards):,} tokens, fewer than seq_len + 1 = "
            f"{seq_len + 1:,}: pass a smaller --seq_len or prepare more data"
        )
    return (len(shards) - 1) // seq_len


def _checked(position: int) -> int:
    if position < 0:
        raise LlmkitError(f"position {position} is negative: it counts samples consumed since the start of training")
    return position
