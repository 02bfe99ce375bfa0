"""Image-text sequences for the vision-language models (llmkit/models/vlm.py): scikit-learn's digits (data/digits.py),
each as an `<image>` marker, a question and the caption "this is a handwritten 3.".

One *shot* is `<image>What digit is this? this is a handwritten 3.` + newline. A Flamingo training row is 1 to
`max_shots` + 1 shots in a row (interleaved image/text, the few-shot form it is asked in); a LLaVA row is one shot,
its marker expanded to the `tokens_per_image` placeholders the projected features fill. Labels are the caption
tokens only (the captioning loss); the marker and the question count for nothing.

Text is encoded piece by piece (around each marker, question and caption apart), so a prompt encodes to exactly the
tokens training saw before the caption. Every row and prompt starts with the tokenizer's BOS token when it has one,
whatever its `add_bos` rule: a causal LM's first position is its *attention sink* (Xiao et al. 2023, "Efficient
Streaming Language Models with Attention Sinks"), which later tokens attend to heavily but read little from, so an
image placed there is barely seen. Measured on frozen SmolLM2-135M-Instruct (2026-12-06; LLaVA's projector, loss on the
digit token, lr 1e-3, 150 steps): the image at position 0, 26% of held-out digits; one BOS first, 75%.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmkit.data.batch import IGNORE_INDEX, Batch
from llmkit.data.digits import DIGIT_WORDS, digit_pixels, shift_augment
from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

IMAGE_MARKER = "<image>"
QUESTION = "What digit is this?"
CAPTION = " this is a handwritten {digit}.\n"


def caption_text(digit: int) -> str:
    return CAPTION.format(digit=digit)


def encode_interleaved(tokenizer: Tokenizer, text: str, marker_id: int, tokens_per_marker: int = 1) -> list[int]:
    """Token ids of text in which each IMAGE_MARKER becomes `tokens_per_marker` copies of `marker_id`."""
    ids: list[int] = []
    for index, piece in enumerate(text.split(IMAGE_MARKER)):
        if index:
            ids += [marker_id] * tokens_per_marker
        if piece:
            ids += tokenizer.encode(piece, add_bos=False)
    return ids


def shot_ids(tokenizer: Tokenizer, digit: int | None, marker_id: int, tokens_per_image: int = 1,
             question: str = QUESTION) -> tuple[list[int], list[bool]]:
    """One shot's ids and which of them are caption tokens: marker + question (+ caption when `digit` is given)."""
    prompt = encode_interleaved(tokenizer, IMAGE_MARKER + question, marker_id, tokens_per_image)
    caption = tokenizer.encode(caption_text(digit), add_bos=False) if digit is not None else []
    return prompt + caption, [False] * len(prompt) + [True] * len(caption)


def few_shot_ids(tokenizer: Tokenizer, shot_digits: Sequence[int], marker_id: int, tokens_per_image: int = 1,
                 question: str = QUESTION) -> list[int]:
    """A prompt: BOS, a captioned shot per digit in `shot_digits`, then the query image's marker and question."""
    ids = tokenizer.bos_prefix
    for digit in [*shot_digits, None]:
        ids += shot_ids(tokenizer, digit, marker_id, tokens_per_image, question)[0]
    return ids


def digit_named(text: str) -> int | None:
    """The first digit a generated caption names, as a numeral or a word ("a handwritten 3", "three"); None."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    for word in words:
        if word.isdigit() and len(word) == 1:
            return int(word)
        if word in DIGIT_WORDS:
            return DIGIT_WORDS.index(word)
    return None


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ids -> (ids (B, T), attention_mask (B, T)) left-padded for generation."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(row)) + list(row) for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return ids, mask


class VLMBatches:
    """The training loop's batch source: `batches(position, batch_size, rank, world)` holds input_ids (B, T),
    labels (B, T) (next caption token, IGNORE_INDEX elsewhere and at right padding) and pixel_values (B, M, 1, 8, 8),
    M images per row. Row i's last image is sample position + i of a seeded endless stream over `images`; with
    `max_shots` > 0 each batch draws M - 1 in 0..max_shots captioned shots of other random images before it."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, tokenizer: Tokenizer, marker_id: int,
                 tokens_per_image: int = 1, max_shots: int = 0, seed: int = 0, augment: bool = True) -> None:
        if max_shots < 0:
            raise LlmkitError(f"max_shots={max_shots} must be 0 or more")
        self.pixels, self.labels = digit_pixels(images), torch.from_numpy(labels)
        self.tokenizer, self.marker_id, self.tokens_per_image = tokenizer, marker_id, tokens_per_image
        self.max_shots, self.seed, self.augment = max_shots, seed, augment
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)

    def __call__(self, position: int, batch_size: int, rank: int = 0, world: int = 1) -> Batch:
        start = position + rank * batch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)  # same position, same batch
        n_shots = int(torch.randint(self.max_shots + 1, (), generator=generator))
        queries = [self._sample(start + i) for i in range(batch_size)]
        shots = torch.randint(len(self.labels), (batch_size, n_shots), generator=generator)
        index = torch.cat([shots, torch.tensor(queries)[:, None]], dim=1)  # (B, M)
        rows, targets = [], []
        start_ids = self.tokenizer.bos_prefix
        for row in index.tolist():
            ids, is_caption = list(start_ids), [False] * len(start_ids)
            for image in row:
                shot, caption_mask = shot_ids(self.tokenizer, int(self.labels[image]), self.marker_id,
                                              self.tokens_per_image)
                ids, is_caption = ids + shot, is_caption + caption_mask
            rows.append(ids[:-1])
            targets.append([token if scored else IGNORE_INDEX for token, scored in zip(ids[1:], is_caption[1:])])
        width = max(map(len, rows))
        input_ids = torch.tensor([row + [self.pad_id] * (width - len(row)) for row in rows])
        labels = torch.tensor([row + [IGNORE_INDEX] * (width - len(row)) for row in targets])
        pixels = self.pixels[index.flatten()]  # (B*M, 1, 8, 8)
        if self.augment:
            pixels = shift_augment(pixels, generator)
        return {"input_ids": input_ids, "labels": labels, "pixel_values": pixels.view(*index.shape, *pixels.shape[1:])}

    def _sample(self, n: int) -> int:
        """The n-th query image of the stream: epoch n // N in its own seeded order."""
        epoch, offset = divmod(n, len(self.labels))
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.seed + epoch))
        return int(order[offset])
