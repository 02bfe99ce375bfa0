"""Streaming over token shards: reads across shard boundaries, per-epoch permutations, resumable positions,
and rank slices that add up to the single-process batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llmkit.data.prepare import prepare
from llmkit.data.shards import SequenceStream, TokenShards, validation_batches
from llmkit.data.tokenizer_train import train_tokenizer
from llmkit.errors import LlmkitError

SHARD_TOKENS = 13  # small and prime: windows and reads straddle shard boundaries everywhere
SEQ_LEN = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"the fox {index} ran to the dog {index * 7}." for index in range(60)), encoding="utf-8")
    tokenizer = train_tokenizer([corpus], vocab_size=280, show_progress=False)
    prepare([corpus], root / "data", tokenizer, val_fraction=0.2, shard_tokens=SHARD_TOKENS, show_progress=False)
    return root / "data"


def _all_tokens(shards: TokenShards) -> np.ndarray:
    """The split read file by file with numpy: the reference the memory-mapped reads must equal."""
    files = shards.manifest["splits"][shards.split]["files"]
    return np.concatenate([np.fromfile(shards.directory / entry["name"], dtype=shards.dtype) for entry in files])


def test_read_spans_shard_boundaries(data_dir: Path) -> None:
    shards = TokenShards(data_dir)
    tokens = _all_tokens(shards)
    assert len(shards) == len(tokens) > 10 * SHARD_TOKENS and len(shards.shards) > 10
    assert shards.read(0, len(shards)).tolist() == tokens.tolist()
    for start, length in [(0, 1), (12, 2), (5, 3 * SHARD_TOKENS + 4), (SHARD_TOKENS, SHARD_TOKENS), (len(tokens) - 3, 3)]:
        assert shards.read(start, length).tolist() == tokens[start : start + length].tolist()
    assert shards.read(len(tokens), 0).size == 0
    with pytest.raises(LlmkitError, match=r"tokens \[\d+, \d+\) are outside the train split's"):
        shards.read(len(tokens) - 2, 3)


def test_each_epoch_is_a_permutation_of_every_sample(data_dir: Path) -> None:
    stream = SequenceStream(TokenShards(data_dir), SEQ_LEN, seed=3)
    n = stream.n_samples
    assert n == (len(stream.shards) - 1) // SEQ_LEN
    epochs = [[stream.global_sample(epoch * n + offset) for offset in range(n)] for epoch in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(n))  # each sample exactly once per epoch
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh order each epoch
    assert [stream.epoch_of(p) for p in (0, n - 1, n, 3 * n)] == [0, 0, 1, 3]
    assert epochs[1] == np.random.default_rng(3 + 1).permutation(n).tolist()  # default_rng(seed + epoch)
    ordered = SequenceStream(TokenShards(data_dir), SEQ_LEN, shuffle=False)
    assert [ordered.global_sample(p) for p in range(n, 2 * n)] == list(range(n))


def test_batches_are_shifted_windows_and_resume_from_a_position(data_dir: Path) -> None:
    shards = TokenShards(data_dir)
    tokens = _all_tokens(shards)
    stream = SequenceStream(shards, SEQ_LEN, seed=0)
    batch_size = 5
    n_steps = stream.n_samples // batch_size + 3  # past the end of the first epoch
    batches = [stream.batch(step * batch_size, batch_size) for step in range(n_steps)]
    assert batches[0].dtype == torch.int64 and batches[0].shape == (batch_size, SEQ_LEN + 1)
    for row in range(batch_size):
        sample = stream.global_sample(batch_size + row)
        window = tokens[sample * SEQ_LEN : sample * SEQ_LEN + SEQ_LEN + 1]
        assert batches[1][row].tolist() == window.tolist()  # inputs row[:-1], targets row[1:]
    resumed = SequenceStream(TokenShards(data_dir), SEQ_LEN, seed=0)  # a new process restarting from step 7
    for step in range(7, n_steps):
        assert torch.equal(resumed.batch(step * batch_size, batch_size), batches[step])
    other_seed = SequenceStream(shards, SEQ_LEN, seed=1)
    assert not torch.equal(other_seed.batch(0, batch_size), batches[0])


def test_rank_slices_concatenate_to_the_single_process_batch(data_dir: Path) -> None:
    stream = SequenceStream(TokenShards(data_dir), SEQ_LEN, seed=0)
    for position in (0, 8, stream.n_samples - 3):  # the last one straddles two epochs
        whole = stream.batch(position, 8)
        halves = [stream.batch(position, 4, rank=rank, world_size=2) for rank in range(2)]
        quarters = [stream.batch(position, 2, rank=rank, world_size=4) for rank in range(4)]
        assert torch.equal(torch.cat(halves), whole) and torch.equal(torch.cat(quarters), whole)
    with pytest.raises(LlmkitError, match="0 <= rank < world_size"):
        stream.batch(0, 4, rank=2, world_size=2)
    with pytest.raises(LlmkitError, match="position -1 is negative"):
        stream.batch(-1, 4)


def test_validation_batches_are_sequential_windows(data_dir: Path) -> None:
    shards = TokenShards(data_dir, "val")
    tokens = _all_tokens(shards)
    n_samples = (len(tokens) - 1) // SEQ_LEN
    batches = list(validation_batches(shards, SEQ_LEN, batch_size=3))
    rows = torch.cat(batches)
    assert len(batches) == -(-n_samples // 3) and rows.shape == (n_samples, SEQ_LEN + 1) and rows.dtype == torch.int64
    for index in range(n_samples):
        assert rows[index].tolist() == tokens[index * SEQ_LEN : index * SEQ_LEN + SEQ_LEN + 1].tolist()
    assert all(batch.shape[0] == 3 for batch in batches[:-1]) and 1 <= batches[-1].shape[0] <= 3
    limited = list(validation_batches(shards, SEQ_LEN, batch_size=3, max_batches=2))
    assert len(limited) == 2 and torch.equal(torch.cat(limited), rows[:6])
    ordered = SequenceStream(shards, SEQ_LEN, shuffle=False)
    assert torch.equal(ordered.batch(0, n_samples), rows)  # the same windows as the unshuffled training stream


def test_too_short_split_and_missing_split(data_dir: Path, tmp_path: Path) -> None:
    val = TokenShards(data_dir, "val")
    with pytest.raises(LlmkitError, match=rf"the val split of .* has {len(val):,} tokens, fewer than seq_len \+ 1 = "
                                          rf"{len(val) + 1:,}: pass a smaller --seq_len or prepare more data"):
        SequenceStream(val, len(val))
    SequenceStream(val, len(val) - 1)  # exactly seq_len + 1 tokens: one sample
    with pytest.raises(LlmkitError, match="fewer than seq_len"):
        next(validation_batches(val, len(val), batch_size=2))
    corpus = tmp_path / "c.txt"
    corpus.write_text("the fox ran", encoding="utf-8")
    tokenizer = train_tokenizer([corpus], vocab_size=260, min_frequency=1, show_progress=False)
    prepare([corpus], tmp_path / "d", tokenizer, val_fraction=0, show_progress=False)
    with pytest.raises(LlmkitError, match=r"has no 'val' split \(it has: train\).*--val_fraction above 0"):
        TokenShards(tmp_path / "d", "val")


def test_shard_size_mismatch_is_reported(data_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in data_dir.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    (copy / "train-00003.bin").write_bytes(b"\x00" * 10)
    with pytest.raises(LlmkitError, match=r"shard .*train-00003\.bin has 10 bytes but manifest\.json lists 13 tokens "
                                          r"\(26 bytes\).*re-run `llmkit prepare`"):
        TokenShards(copy)
    with pytest.raises(LlmkitError, match=r"data directory .*missing does not exist: run `llmkit prepare"):
        TokenShards(tmp_path / "missing")
