"""Train a byte-level BPE tokenizer (GPT-2 style) on your text with Hugging Face `tokenizers`.

Byte-level BPE (Radford et al. 2019, GPT-2) starts from the 256 byte values, so any UTF-8 text encodes and decodes
back exactly, then repeatedly merges the most frequent adjacent pair inside the pre-tokenizer's pieces (words,
number runs, punctuation runs, whitespace) until the vocabulary reaches `vocab_size`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

BYTE_ALPHABET_SIZE = 256
# Largest vocabulary llmkit trains: 4x Gemma 3's 262,144, the largest in common use. BPE training allocates per
# requested token up front (1,000,000,000 asked the trainer for 70 GB and aborted in Rust), and an embedding of
# 2**20 rows is already 1 GB per 256 dimensions in fp32.
MAX_VOCAB_SIZE = 2**20
DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)
TRAINING_RECORD_FILE = "llmkit_tokenizer_training.json"  # how a tokenizer directory was trained: lets prepare reuse it


def train_tokenizer(
    paths: Sequence[str | Path],
    vocab_size: int = 8192,
    text_field: str = "text",
    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    show_progress: bool = True,
) -> Tokenizer:
    """Byte-level BPE trained on the documents of `paths`; the first special token is EOS (no BOS is added)."""
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    from llmkit.data.sources import expand_inputs, read_documents

    special_tokens = list(special_tokens)
    if not special_tokens:
        raise LlmkitError("special_tokens is empty: give at least one; the first is the end-of-text (EOS) token")
    if len(set(special_tokens)) != len(special_tokens) or not all(special_tokens):
        raise LlmkitError(f"special_tokens {special_tokens} must be distinct, non-empty strings")
    check_vocab_size(vocab_size, len(special_tokens))
    if min_frequency < 1:
        raise LlmkitError(f"min_frequency {min_frequency} must be at least 1 (a pair seen fewer times is never merged)")
    expand_inputs(paths)  # fail on a bad path before training starts

    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split regex
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=special_tokens,  # ids 0..k-1, matched whole in text, never merged
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not: any text round-trips
        show_progress=show_progress and sys.stdout.isatty(),  # its bar prints blank lines into logs and pipes
    )
    backend.train_from_iterator(read_documents(paths, text_field), trainer=trainer)
    eos_id = backend.token_to_id(special_tokens[0])
    return Tokenizer(backend, bos_id=None, eos_id=eos_id, pad_id=None, add_bos=False)


def check_vocab_size(vocab_size: int, n_special_tokens: int = len(DEFAULT_SPECIAL_TOKENS)) -> None:
    """Refuse a vocabulary size BPE cannot reach (no room for merges) or should not try (beyond MAX_VOCAB_SIZE),
    before any text is read."""
    smallest = BYTE_ALPHABET_SIZE + n_special_tokens + 1
    if vocab_size < smallest:
        raise LlmkitError(
            f"vocab_size {vocab_size} leaves no room for merges: byte-level BPE needs the {BYTE_ALPHABET_SIZE} bytes plus "
            f"{n_special_tokens} special token(s); pass --vocab_size {smallest} or more (8192 is a good small size)"
        )
    if vocab_size > MAX_VOCAB_SIZE:
        raise LlmkitError(
            f"--vocab_size {vocab_size:,} is more than llmkit trains ({MAX_VOCAB_SIZE:,} = 2**20; the largest common "
            "vocabularies have 262,144 tokens, and BPE training memory grows with the size): pass --vocab_size "
            "32000 to 262144"
        )


def training_record(paths: Sequence[str | Path], vocab_size: int, text_field: str, min_frequency: int,
                    special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS) -> dict[str, Any]:
    """What a trained tokenizer depends on: its inputs' fingerprints and the training settings."""
    from llmkit.data.sources import fingerprint_inputs

    return {
        "inputs": fingerprint_inputs(paths), "vocab_size": vocab_size, "text_field": text_field,
        "min_frequency": min_frequency, "special_tokens": list(special_tokens),
    }  # fmt: skip


def save_trained(tokenizer: Tokenizer, directory: str | Path, record: dict[str, Any]) -> None:
    """Save the tokenizer (tokenizer.json, tokenizer_config.json) and, last, the record of how it was trained."""
    from llmkit.io import atomic_write_text

    directory = Path(directory)
    (directory / TRAINING_RECORD_FILE).unlink(missing_ok=True)  # never a record beside a half-replaced tokenizer
    tokenizer.save(directory)
    atomic_write_text(directory / TRAINING_RECORD_FILE, json.dumps(record, indent=2) + "\n")


def reusable_tokenizer(directory: str | Path, record: dict[str, Any]) -> Tokenizer | None:
    """The tokenizer saved in `directory` if it was trained from exactly `record`, else None."""
    record_file = Path(directory) / TRAINING_RECORD_FILE
    if not record_file.is_file():
        return None
    try:
        saved = json.loads(record_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if saved != json.loads(json.dumps(record)):
        return None
    try:
        return Tokenizer.from_dir(directory)
    except LlmkitError:
        return None


