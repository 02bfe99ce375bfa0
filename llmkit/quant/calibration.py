"""Calibration for GPTQ and AWQ: token windows of a text, and the block-by-block walk both methods share.

`calibration_batches` draws `n_sequences` windows of `seq_len` tokens at seeded random offsets of a UTF-8 text (the
user's, or the built-in Tiny Shakespeare), after its first HELD_OUT_TOKENS tokens: `llmkit quantize` and the tests
score the first 2,048 tokens of the built-in text, so the calibration never sees the tokens it is judged on.

`block_inputs` runs the embedding part of a decoder on every batch of windows and stops at block 0 (a forward
pre-hook raises, GPTQ's "Catcher"): what comes back is each batch's input (B, T, C) to block 0 and its attention
context. A method then walks the blocks in order, turning block i's inputs into block i + 1's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmkit.data.sources import builtin_corpus_path
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.nn.attention import AttentionContext

HELD_OUT_TOKENS = 2048  # the first tokens of a calibration text are never drawn (llmkit quantize scores them)
DEFAULT_SEQUENCES = 128  # GPTQ's and AWQ's papers: 128 random windows...
DEFAULT_SEQ_LEN = 512  # ...of 512 tokens (AWQ; GPTQ uses 2,048)
DEFAULT_BATCH_SIZE = 8  # windows per forward while calibrating


def calibration_batches(
    tokenizer,  # noqa: ANN001 (llmkit Tokenizer)
    text_path: str | Path | None = None,
    n_sequences: int = DEFAULT_SEQUENCES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> torch.Tensor:
    """Token ids (n_sequences, seq_len), windows at seeded random offsets of the text after its first
    HELD_OUT_TOKENS tokens (default text: the built-in Tiny Shakespeare). Windows may overlap.

    Raises:
        LlmkitError: a missing or non-UTF-8 file, n_sequences or seq_len < 1, or a text too short for one window.
    """
    if n_sequences < 1 or seq_len < 2:
        raise LlmkitError(f"calibration needs --n_sequences >= 1 and a sequence length >= 2; got {n_sequences} and "
                          f"{seq_len}")
    path = builtin_corpus_path() if text_path is None else Path(text_path)
    if not path.is_file():
        raise LlmkitError(f"--calibration {path} is not a file; pass a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LlmkitError(f"--calibration {path} is not UTF-8 text ({error}); convert it to UTF-8 first") from None
    ids = tokenizer.encode_array(text, dtype=np.int64)
    room = len(ids) - HELD_OUT_TOKENS - seq_len
    if room < 0:
        raise LlmkitError(f"--calibration {path} has {len(ids):,} tokens; calibration skips the first "
                          f"{HELD_OUT_TOKENS:,} and needs {seq_len:,} more for one window: pass a longer text")
    generator = torch.Generator().manual_seed(seed)
    starts = HELD_OUT_TOKENS + torch.randint(0, room + 1, (n_sequences,), generator=generator)
    tokens = torch.from_numpy(ids)
    return torch.stack([tokens[start : start + seq_len] for start in starts.tolist()])  # (N, T)


class _BlockInput(Exception):  # noqa: N818 (control flow, never seen by a user)
    def __init__(self, args: tuple) -> None:
        super().__init__()
        self.block_args = args


def check_decoder(model: nn.Module, method: str) -> Decoder:
    if not isinstance(model, Decoder):
        raise LlmkitError(f"{method} calibrates a decoder's blocks; got a {type(model).__name__}: pass a decoder "
                          "(llmkit.models.decoder.Decoder)")
    return model


def block_inputs(
    model: Decoder, ids: torch.Tensor, batch_size: int = DEFAULT_BATCH_SIZE,
) -> list[tuple[torch.Tensor, AttentionContext]]:
    """(input of block 0 (B, T, C), attention context) of each batch of `ids` (N, T), computed without the blocks."""
    if ids.dim() != 2 or ids.shape[1] > model.config.max_seq_len:
        raise LlmkitError(f"calibration ids must be (sequences, tokens) with at most {model.config.max_seq_len} tokens "
                          f"(the model's context); got shape {tuple(ids.shape)}: pass a shorter sequence length")

    def stop(module: nn.Module, args: tuple) -> None:
        raise _BlockInput(args)

    device = model.embed.weight.device
    batches = []
    handle = model.blocks[0].register_forward_pre_hook(stop)
    try:
        with torch.no_grad():
            for batch in ids.split(batch_size):
                try:
                    model.hidden_states(batch.to(device))
                except _BlockInput as caught:
                    x, context = caught.block_args
                    batches.append((x, context))
    finally:
        handle.remove()
    return batches
