"""Real images for the vision demos: scikit-learn's bundled handwritten digits (1,797 8x8 grey images, UCI ML
hand-written digits, 0..16 ink levels), a fixed stratified held-out split, captions for CLIP and the byte-level
tokenizer that encodes them.

Captions come from TRAIN_TEMPLATES ("a handwritten seven", "a photo of the digit 7", ...); zero-shot evaluation uses
UNSEEN_TEMPLATES, phrasings training never shows, so it measures whether the text tower learnt the digit's name
rather than the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from llmkit.errors import LlmkitError
from llmkit.tokenizer import Tokenizer

DIGIT_IMAGE_SIZE = 8
DIGIT_INK_LEVELS = 16  # load_digits counts ink 0..16 per pixel; x * 255/16 makes 8-bit grey (white ink on black)
HELD_OUT_EVERY = 5  # every 5th image of each class (in the dataset's order) is held out: a fixed, stratified 20%
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_TEMPLATES = ("a handwritten {word}", "a photo of the digit {digit}", "the number {word}",
                   "a picture of a {word}", "an image of the digit {word}", "a scan of a handwritten {digit}",
                   "{word}", "the digit {digit}", "a small grey {word}", "a blurry photo of the number {digit}")
UNSEEN_TEMPLATES = ("a drawing of a {word}", "this is the digit {digit}", "a low resolution {word}",
                    "someone wrote a {digit}", "a pixelated number {word}")
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<|pad|>"


@dataclass
class DigitsSplit:
    """The digits as 8-bit grey images (N, 8, 8) uint8 and labels (N,) int64, training and held-out parts."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


def load_digits_split() -> DigitsSplit:
    """scikit-learn's digits, every HELD_OUT_EVERY-th image of each class held out (364 of 1,797)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.round(digits.images * (255 / DIGIT_INK_LEVELS)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    held_out = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        held_out[np.flatnonzero(labels == digit)[::HELD_OUT_EVERY]] = True
    return DigitsSplit(images[~held_out], labels[~held_out], images[held_out], labels[held_out])


def digit_pixels(images: np.ndarray) -> torch.Tensor:
    """8-bit grey digits (N, 8, 8) -> pixels (N, 1, 8, 8) as `processing_for(1, 8)` gives: x / 255, then
    (x - 0.5) / 0.5 (no resize: they are already 8x8)."""
    return (torch.from_numpy(images).float()[:, None] / 255 - 0.5) / 0.5


def caption(digit: int, template: str) -> str:
    """A template filled with a digit's word and numeral: caption(7, "a handwritten {word}") = "a handwritten seven"."""
    return template.format(word=DIGIT_WORDS[digit], digit=digit)


def caption_tokenizer() -> Tokenizer:
    """Byte-level tokens without merges (id = byte value), plus EOS (256) and padding (257): any caption, in any
    phrasing, encodes, which zero-shot labels need."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as BackendTokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character table

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}  # 256 single-byte tokens, no merges
    backend = BackendTokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True), AddedToken(PAD_TOKEN, special=True)])
    return Tokenizer(backend, eos_id=backend.token_to_id(EOS_TOKEN), pad_id=backend.token_to_id(PAD_TOKEN))


def encode_captions(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int, flag: str = "--labels") -> torch.Tensor:
    """Token ids (B, T) of captions, each between BOS (when the tokenizer has one, as CLIP's) and EOS and right-padded
    with the pad id (EOS without one); a caption longer than `max_tokens` or an empty one is an error naming `flag`."""
    if not texts:
        raise LlmkitError(f'{flag} is empty; give at least one caption, e.g. {flag} "[a cat, a dog]"')
    rows = []
    for text in texts:
        if not text.strip():
            raise LlmkitError(f"{flag}: a caption is empty; give words for each one")
        ids = tokenizer.bos_prefix + tokenizer.encode(text, add_bos=False) + [tokenizer.eos_id]
        if len(ids) > max_tokens:
            raise LlmkitError(f"{flag}: {text!r} is {len(ids)} tokens with EOS; the text tower takes {max_tokens}: "
                              "shorten it")
        rows.append(ids)
    width = max(map(len, rows))
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    padded = [ids + [pad] * (width - len(ids)) for ids in rows]
    return torch.tensor(padded, dtype=torch.long)


def shift_augment(pixels: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Each image (B, C, H, W) moved by a random whole-pixel offset in [-max_shift, max_shift] on both axes, the
    uncovered border filled with the background (the minimum value): handwriting sits a little off-centre."""
    B, _, H, W = pixels.shape
    background = float(pixels.min())
    padded = torch.nn.functional.pad(pixels, (max_shift,) * 4, value=background)  # (B, C, H + 2s, W + 2s)
    offsets = torch.randint(0, 2 * max_shift + 1, (B, 2), generator=generator)
    return torch.stack([padded[b, :, dy : dy + H, dx : dx + W] for b, (dy, dx) in enumerate(offsets.tolist())])


class DigitBatches:
    """The training loop's batch source over digit images: `batches(position, batch_size, rank, world)` is the
    rank's share of the global batch starting at sample `position` of an endless stream that visits every image once
    per epoch in a seeded random order. Batches hold pixel_values and labels (class ids); with `captions` (CLIP)
    they also hold input_ids, one caption per image from a random training template, and labels = arange(B), the
    caption row of each image."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0, augment: bool = True,
                 captions: Tokenizer | None = None, max_tokens: int = 48) -> None:
        self.pixels, self.labels = digit_pixels(images), torch.from_numpy(labels)
        self.seed, self.augment, self.tokenizer, self.max_tokens = seed, augment, captions, max_tokens
        self._orders: dict[int, torch.Tensor] = {}

    def __call__(self, position: int, batch_size: int, rank: int = 0, world: int = 1) -> dict[str, torch.Tensor]:
        start = position + rank * batch_size
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + start)  # same position, same batch
        index = torch.tensor([self._sample(start + i) for i in range(batch_size)])
        pixels = self.pixels[index]
        if self.augment:
            pixels = shift_augment(pixels, generator)
        if self.tokenizer is None:
            return {"pixel_values": pixels, "labels": self.labels[index]}
        templates = torch.randint(len(TRAIN_TEMPLATES), (batch_size,), generator=generator).tolist()
        texts = [caption(int(digit), TRAIN_TEMPLATES[t]) for digit, t in zip(self.labels[index], templates)]
        return {"pixel_values": pixels, "input_ids": encode_captions(self.tokenizer, texts, self.max_tokens),
                "labels": torch.arange(batch_size)}

    def _sample(self, n: int) -> int:
        """The n-th image of the stream: epoch n // N in its own seeded order."""
        epoch, offset = divmod(n, len(self.labels))
        if epoch not in self._orders:
            self._orders = {epoch: torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(
                self.seed + epoch))}  # one epoch's order kept at a time
        return int(self._orders[epoch][offset])
