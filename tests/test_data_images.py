"""Image preprocessing (llmkit/data/images.py) against transformers' ViT and CLIP image processors on real photos,
and the digits data (llmkit/data/digits.py): the held-out split, captions and their tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, ViTImageProcessor

from llmkit.data.digits import (
    DIGIT_WORDS,
    TRAIN_TEMPLATES,
    UNSEEN_TEMPLATES,
    caption,
    caption_tokenizer,
    encode_captions,
    load_digits_split,
)
from llmkit.data.images import (
    CLIP_PROCESSING,
    VIT_PROCESSING,
    ImageProcessing,
    load_image,
    preprocess,
    processing_for,
    sample_photos,
)
from llmkit.errors import LlmkitError

PIXEL_TOLERANCE = 1e-5  # the same PIL resize, then float32 arithmetic in another order (~5e-7 seen)


@pytest.fixture(scope="module")
def photos() -> dict[str, Image.Image]:
    return {name: Image.fromarray(array) for name, array in sample_photos().items()}


@pytest.mark.parametrize("name", ["chelsea", "astronaut", "rocket"])  # landscape, square, landscape
def test_preprocessing_matches_transformers_processors(photos, name) -> None:
    photo = photos[name]
    for reference, ours in ((ViTImageProcessor(), VIT_PROCESSING), (CLIPImageProcessor(), CLIP_PROCESSING)):
        expected = reference(images=[photo], return_tensors="pt")["pixel_values"]
        pixels = preprocess([photo], ours)
        assert pixels.shape == expected.shape == (1, 3, 224, 224)
        assert (pixels - expected).abs().max() <= PIXEL_TOLERANCE


def test_portrait_photo_and_other_sizes_match_clip(photos) -> None:
    portrait = photos["rocket"].rotate(90, expand=True)  # taller than wide: the width becomes the short side
    reference = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 48, "width": 56})
    ours = ImageProcessing(size=None, shortest_edge=64, crop=(48, 56), resample=3, mean=CLIP_PROCESSING.mean,
                           std=CLIP_PROCESSING.std)
    expected = reference(images=[portrait], return_tensors="pt")["pixel_values"]
    assert (preprocess([portrait], ours) - expected).abs().max() <= PIXEL_TOLERANCE


def test_saved_settings_load_in_transformers_and_back(tmp_path, photos) -> None:
    processing = ImageProcessing(size=None, shortest_edge=40, crop=(32, 32), resample=3, mean=(0.1, 0.2, 0.3),
                                 std=(0.5, 0.6, 0.7))
    processing.save(tmp_path)
    assert ImageProcessing.load(tmp_path) == processing
    reference = CLIPImageProcessor.from_pretrained(tmp_path)
    expected = reference(images=[photos["chelsea"]], return_tensors="pt")["pixel_values"]
    assert (preprocess([photos["chelsea"]], processing) - expected).abs().max() <= PIXEL_TOLERANCE


def test_grayscale_digit_processing_gives_one_channel(tmp_path) -> None:
    digit = load_digits_split().test_images[0]  # (8, 8) uint8
    processing = processing_for(1, 8)
    pixels = preprocess([digit], processing)
    assert pixels.shape == (1, 1, 8, 8)
    assert torch.allclose(pixels[0, 0], torch.from_numpy(digit / 255 * 2 - 1).float(), atol=1e-6)
    processing.save(tmp_path)
    assert processing_for(1, 8, tmp_path) == processing


def test_load_image_errors_name_the_flag(tmp_path) -> None:
    with pytest.raises(LlmkitError, match="^--images: .*missing.png does not exist"):
        load_image(tmp_path / "missing.png", "--images")
    text = tmp_path / "fake.jpg"
    text.write_text("hello")
    with pytest.raises(LlmkitError, match="^--images: .*is not an image"):
        load_image(text, "--images")
    Image.fromarray(np.zeros((3, 5, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    assert load_image(tmp_path / "ok.png").size == (5, 3)


def test_digits_split_is_stratified_and_disjoint() -> None:
    split = load_digits_split()
    assert len(split.train_labels) + len(split.test_labels) == 1797
    for digit in range(10):
        share = (split.test_labels == digit).sum() / ((split.test_labels == digit).sum()
                                                       + (split.train_labels == digit).sum())
        assert 0.19 <= share <= 0.21
    train_rows = {image.tobytes() for image in split.train_images}
    assert sum(image.tobytes() in train_rows for image in split.test_images) < 5  # the dataset has a few duplicates
    assert split.train_images.dtype == np.uint8 and split.train_images.max() == 255


def test_captions_and_unseen_templates() -> None:
    assert caption(7, "a handwritten {word}") == "a handwritten seven"
    assert caption(7, "a photo of the digit {digit}") == "a photo of the digit 7"
    assert not set(TRAIN_TEMPLATES) & set(UNSEEN_TEMPLATES)
    unseen_words = {word for template in UNSEEN_TEMPLATES for word in template.split() if "{" not in word}
    assert unseen_words - {word for template in TRAIN_TEMPLATES for word in template.split()}  # new words too
    assert len(DIGIT_WORDS) == 10


def test_encode_captions_pads_after_eos_and_refuses_bad_labels() -> None:
    tokenizer = caption_tokenizer()
    ids = encode_captions(tokenizer, ["a 7", "the digit seven"], 40)
    assert ids.shape == (2, len("the digit seven") + 1)
    assert ids[0, :4].tolist() == [*b"a 7", tokenizer.eos_id]
    assert set(ids[0, 4:].tolist()) == {tokenizer.pad_id}
    with pytest.raises(LlmkitError, match="^--labels is empty"):
        encode_captions(tokenizer, [], 40)
    with pytest.raises(LlmkitError, match="^--labels: a caption is empty"):
        encode_captions(tokenizer, ["a cat", " "], 40)
    with pytest.raises(LlmkitError, match="^--labels: .* 41 tokens"):
        encode_captions(tokenizer, ["x" * 40], 40)
