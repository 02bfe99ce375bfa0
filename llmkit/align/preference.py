"""Preference data: pairs of responses to one prompt, the first preferred by a person (or a model) over the second.
What reward models (Bradley-Terry) and the DPO family learn from.

Rows (JSONL, one object a line, read through llmkit.data.jsonl):

    {"prompt": "...", "chosen": "...", "rejected": "..."}        the prompt and two responses, or
    {"chosen": "<whole transcript>", "rejected": "<whole transcript>"}

A pair of whole transcripts (Anthropic HH-RLHF's format) is split at their common prefix: the prompt is that
prefix up to and including its last "\\n\\nAssistant:", the responses are what follows. In HH-RLHF's harmless-base
test split, 2,307 of 2,312 pairs differ only in the final assistant turn, so the prompt is the whole conversation
before it; in the others the responses hold the turns after the last shared "Assistant:".

Tokenization (`tokenize_pairs`): prompt ids as the model's tokenizer writes them (BOS by its rule), each response
encoded on its own and ended with EOS, so a response's last token is always EOS unless truncation cut it.
Truncation rules, applied in this order and counted in the `PairReport`:
  1. a prompt longer than `max_prompt_length` keeps its last `max_prompt_length` tokens (the turn being answered);
  2. a response that does not fit beside the prompt in `max_length` keeps its first `max_length - len(prompt)`
     tokens (losing its EOS).
Batches (`pair_batch`) hold chosen and rejected sequences in one padded batch: rows 0..P-1 chosen, P..2P-1 rejected.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from llmkit.data.jsonl import parse_object, read_lines
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

ASSISTANT_MARKER = "\n\nAssistant:"  # HH-RLHF transcripts: the prompt ends with the last shared marker
HH_RLHF_FILE = "hh_rlhf/harmless-base/test.jsonl.gz"  # under the shared data folder (see its SOURCE.md)
PROMPT, CHOSEN, REJECTED = "prompt", "chosen", "rejected"
REPORTED_ERRORS = 5
PaddingSide = Literal["right", "left"]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str  # the preferred response
    rejected: str
    origin: str = ""  # "file, line N", for messages


@dataclass
class TokenizedPair:
    """Token ids of one pair; the reference model's summed log-probs of each response once computed (DPO caches
    them here, before training)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen_logp: float | None = None
    ref_rejected_logp: float | None = None


@dataclass
class PairReport:
    """What reading and tokenizing did: rows read, bad rows skipped, prompts and responses truncated."""

    rows: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    def skip(self, message: str) -> None:
        self.skipped += 1
        if len(self.errors) < REPORTED_ERRORS:
            self.errors.append(message)

    def summary(self) -> str:
        text = (f"{self.rows:,} rows; {self.skipped:,} bad rows skipped, {self.prompts_truncated:,} prompts and "
                f"{self.responses_truncated:,} responses truncated")
        return text + "".join(f"\n  skipped: {message}" for message in self.errors)


# ---- reading ---------------------------------------------------------------------------------------------------------


def parse_pair(row: dict[str, Any] | str, origin: str) -> PreferencePair:
    """One row (an object or a JSONL line's text) as a PreferencePair; errors name the row, the field and the fix."""
    if isinstance(row, str):
        row = parse_object(row, origin)
    fields = ", ".join(map(str, row)) or "none"
    for name in (CHOSEN, REJECTED):
        if name not in row:
            raise LlmkitError(f"{origin}: no field '{name}' (fields: {fields}); a preference row needs 'chosen' and "
                              "'rejected' (and optionally 'prompt')")
        if not isinstance(row[name], str) or not row[name].strip():
            raise LlmkitError(f"{origin}: field '{name}' must be non-empty text; fix or delete the row")
    if row[CHOSEN] == row[REJECTED]:
        raise LlmkitError(f"{origin}: 'chosen' and 'rejected' are the same text, which teaches no preference; drop "
                          "the row")
    if row.get(PROMPT) is not None:
        if not isinstance(row[PROMPT], str):
            raise LlmkitError(f"{origin}: field 'prompt' holds a {type(row[PROMPT]).__name__}, not text; fix the row")
        return PreferencePair(row[PROMPT], row[CHOSEN], row[REJECTED], origin)
    return split_transcripts(row[CHOSEN], row[REJECTED], origin)


def split_transcripts(chosen: str, rejected: str, origin: str = "") -> PreferencePair:
    """Prompt = the common prefix of two transcripts up to and including its last ASSISTANT_MARKER."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(ASSISTANT_MARKER, 0, common)  # the marker lies wholly inside the shared prefix
    if cut < 0:
        raise LlmkitError(f"{origin}: 'chosen' and 'rejected' share no prefix ending with {ASSISTANT_MARKER!r}, so the "
                          "prompt cannot be found; add a 'prompt' field and give only the responses")
    end = cut + len(ASSISTANT_MARKER)
    return PreferencePair(chosen[:end], chosen[end:], rejected[end:], origin)


def load_pairs(
    paths: str | Path | Sequence[str | Path], limit: int | None = None, skip_bad_rows: bool = False,
    report: PairReport | None = None,
) -> tuple[list[PreferencePair], PairReport]:
    """Pairs of every JSONL file in order (at most `limit`); a bad row raises, or is counted and skipped."""
    report = report or PairReport()
    pairs: list[PreferencePair] = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for number, line in read_lines(path):
            if limit is not None and len(pairs) >= limit:
                return pairs, report
            report.rows += 1
            try:
                pairs.append(parse_pair(line, f"{path}, line {number}"))
            except LlmkitError as error:
                if not skip_bad_rows:
                    raise
                report.skip(str(error))
    if not pairs:
        raise LlmkitError(f"no usable preference pairs in {paths}"
                          + (f" (first problem: {report.errors[0]})" if report.errors else ""))
    return pairs, report


def builtin_hh_rlhf(limit: int | None = None) -> list[PreferencePair]:
    """Anthropic HH-RLHF harmless-base test split (Bai et al. 2022, MIT), read in place from the shared data."""
    from llmkit.data.shared import shared_data_file

    return load_pairs(shared_data_file(HH_RLHF_FILE), limit=limit)[0]


def split_held_out(pairs: Sequence[Any], held_out: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, held-out): a seeded shuffle, then the last round(held_out x n) items (at least 1) are held out."""
    if not 0 < held_out < 1:
        raise LlmkitError(f"--held_out {held_out} must be a fraction in (0, 1), e.g. 0.1")
    if len(pairs) < 2:
        raise LlmkitError(f"{len(pairs)} pair(s) cannot be split into training and held-out sets; give at least 2")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(held_out * len(pairs))), len(pairs) - 1)
    return [pairs[i] for i in order[:-n_held]], [pairs[i] for i in order[-n_held:]]


# ---- tokenizing and batching -----------------------------------------------------------------------------------------


def tokenize_pairs(
    pairs: Sequence[PreferencePair], tokenizer: Tokenizer, max_length: int = 512, max_prompt_length: int = 256,
    report: PairReport | None = None,
) -> tuple[list[TokenizedPair], PairReport]:
    """Token ids of each pair, truncated by the rules in the module docstring."""
    report = report or PairReport()
    if not 1 <= max_prompt_length < max_length:
        raise LlmkitError(f"--max_prompt_length {max_prompt_length} must be at least 1 and below --max_length "
                          f"{max_length}, so every response keeps a token")
    if tokenizer.eos_id is None:
        raise LlmkitError("the tokenizer has no EOS token, so responses cannot end: set tokenizer.eos_id")
    tokenized = []
    for pair in pairs:
        prompt = tokenizer.encode(pair.prompt)
        if len(prompt) > max_prompt_length:
            prompt = prompt[len(prompt) - max_prompt_length:]
            report.prompts_truncated += 1
        room = max_length - len(prompt)
        responses = []
        for text in (pair.chosen, pair.rejected):
            ids = tokenizer.encode(text, add_bos=False) + [tokenizer.eos_id]
            if len(ids) > room:
                ids = ids[:room]
                report.responses_truncated += 1
            responses.append(ids)
        tokenized.append(TokenizedPair(prompt, *responses))
    return tokenized, report


def pair_batch(pairs: Sequence[TokenizedPair], pad_id: int, padding_side: PaddingSide = "right") -> dict[str, torch.Tensor]:
    """One padded batch of P pairs: chosen rows 0..P-1, rejected rows P..2P-1.

    input_ids, attention_mask (1 = real token), response_mask (1 = a response token, the ones scored), each (2P, T);
    labels (P,) = 0, "the first of the two is preferred": the loop counts pairs through them (a pairwise loss
    averages over pairs as a token loss does over tokens); ref_chosen_logps, ref_rejected_logps (P,) when cached.
    """
    if padding_side not in ("right", "left"):
        raise LlmkitError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    sequences = [(pair.prompt, pair.chosen) for pair in pairs] + [(pair.prompt, pair.rejected) for pair in pairs]
    width = max(len(prompt) + len(response) for prompt, response in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    response_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        start = 0 if padding_side == "right" else width - length
        input_ids[row, start:start + length] = torch.tensor(prompt + response)
        attention_mask[row, start:start + length] = 1
        response_mask[row, start + len(prompt):start + length] = True
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
             "labels": torch.zeros(len(pairs), dtype=torch.long)}
    if all(pair.ref_chosen_logp is not None for pair in pairs):
        batch["ref_chosen_logps"] = torch.tensor([pair.ref_chosen_logp for pair in pairs], dtype=torch.float32)
        batch["ref_rejected_logps"] = torch.tensor([pair.ref_rejected_logp for pair in pairs], dtype=torch.float32)
    return batch


class PairBatches:
    """The training loop's batch source over tokenized pairs: `batches(position, batch_size, rank, world_size)`,
    pairs in a seeded order that changes each epoch (as llmkit.data.packing.SFTBatches orders SFT rows)."""

    def __init__(self, pairs: Sequence[TokenizedPair], pad_id: int, seed: int = 0, shuffle: bool = True) -> None:
        if not pairs:
            raise LlmkitError("no preference pairs to batch; check --data")
        self.pairs, self.pad_id, self.seed, self.shuffle = list(pairs), pad_id, seed, shuffle
        self._permutation: tuple[int, np.ndarray] | None = None

    def pair_at(self, position: int) -> TokenizedPair:
        epoch, offset = divmod(position, len(self.pairs))
        if self.shuffle:
            if self._permutation is None or self._permutation[0] != epoch:
                self._permutation = (epoch, np.random.default_rng(self.seed + epoch).permutation(len(self.pairs)))
            offset = int(self._permutation[1][offset])
        return self.pairs[offset]

    def __call__(self, position: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict[str, torch.Tensor]:
        """This rank's slice of the global batch at `position`: pairs [position + rank * batch_size, ...)."""
        first = position + rank * batch_size
        return pair_batch([self.pair_at(first + k) for k in range(batch_size)], self.pad_id)


def held_out_batches(pairs: Sequence[TokenizedPair], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Every held-out pair once, in order, in batches of `batch_size` (the last may be smaller)."""
    return [pair_batch(pairs[start:start + batch_size], pad_id) for start in range(0, len(pairs), batch_size)]
