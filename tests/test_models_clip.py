"""CLIP (llmkit/models/clip.py): numerics against transformers' CLIPModel built from tiny random configs here, the
symmetric InfoNCE loss against transformers' own, learning on real digits with generated captions through the one
loop (zero-shot with unseen templates above chance), and the `clip` verbs' bad inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmkit.checkpoints import load_model, save_model
from llmkit.commands.clip import zero_shot_accuracy
from llmkit.data.digits import (
    UNSEEN_TEMPLATES,
    DigitBatches,
    caption_tokenizer,
    digit_pixels,
    encode_captions,
    load_digits_split,
)
from llmkit.errors import LlmkitError
from llmkit.models.clip import CLIP, ClipConfig, clip_text_config, clip_vision_config, contrastive_loss
from llmkit.train.loop import train
from llmkit.train.objectives import clip_contrastive_loss
from llmkit.train.settings import TrainSettings
from tests.helpers import cli_status, run_cli

TOLERANCE = 1e-4  # fp32, same operations in another order


def hf_clip(eos_token_id: int = 99, hidden_act: str = "quick_gelu") -> transformers.CLIPModel:
    text = transformers.CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                       vocab_size=100, max_position_embeddings=16, eos_token_id=eos_token_id,
                                       bos_token_id=98, pad_token_id=0, hidden_act=hidden_act)
    vision = transformers.CLIPVisionConfig(hidden_size=40, intermediate_size=56, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=8, patch_size=4, num_channels=3,
                                           hidden_act=hidden_act)
    torch.manual_seed(0)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                          projection_dim=24)).eval()


def caption_ids(eos: int) -> torch.Tensor:
    """Three captions of different lengths: BOS, words, EOS, then right padding (0)."""
    ids = torch.randint(3, 98, (3, 10), generator=torch.Generator().manual_seed(1))
    ids[:, 0] = 98
    for row, end in enumerate((9, 5, 3)):
        ids[row, end] = eos
        ids[row, end + 1 :] = 0
    return ids


@pytest.mark.parametrize(("eos", "hidden_act"), [(99, "quick_gelu"), (2, "gelu")])  # 2: the legacy argmax pooling
def test_imported_clip_matches_transformers(tmp_path, one_thread, eos, hidden_act) -> None:
    reference = hf_clip(eos, hidden_act)
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, CLIP)
    pixels, ids = torch.randn(2, 3, 8, 8), caption_ids(eos if eos != 2 else 99)  # legacy: the largest id ends
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels)
        images, texts = model.image_embeddings(pixels), model.text_embeddings(ids)
        assert (images - expected.image_embeds).abs().max() <= TOLERANCE
        assert (texts - expected.text_embeds).abs().max() <= TOLERANCE
        assert (model.logits_per_image(images, texts) - expected.logits_per_image).abs().max() <= TOLERANCE
        assert (model(pixels, ids) - expected.logits_per_image).abs().max() <= TOLERANCE


def test_contrastive_loss_is_transformers_clip_loss(one_thread) -> None:
    reference = hf_clip()
    ids = caption_ids(99)
    with torch.no_grad():
        output = reference(input_ids=ids, pixel_values=torch.randn(3, 3, 8, 8), return_loss=True)
    logits = output.logits_per_image
    assert torch.allclose(contrastive_loss(logits), output.loss, atol=1e-6)
    assert torch.allclose(contrastive_loss(logits, reduction="sum"), 3 * output.loss, atol=1e-5)
    with pytest.raises(LlmkitError, match="square"):
        contrastive_loss(torch.zeros(3, 4))


def tiny_digit_clip() -> tuple[CLIP, object]:
    tokenizer = caption_tokenizer()
    config = ClipConfig(text=clip_text_config(tokenizer.vocab_size, tokenizer.eos_id, 48, 32, 1, pad_id=tokenizer.pad_id),
                        vision=clip_vision_config(8, 4, 1, 32, 2), projection_dim=32, name="tiny-clip",
                        logit_scale_init=1.0)
    torch.manual_seed(0)
    return CLIP(config), tokenizer


def test_objective_reads_each_images_caption_row(one_thread) -> None:
    """labels name the caption row of each image: shuffling the captions and their labels together changes nothing."""
    model, tokenizer = tiny_digit_clip()
    digits = load_digits_split()
    batch = DigitBatches(digits.train_images, digits.train_labels, captions=tokenizer)(0, 8)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    shuffled = dict(batch, input_ids=batch["input_ids"][order], labels=torch.argsort(order))
    with torch.no_grad():
        plain, moved = clip_contrastive_loss(model, batch), clip_contrastive_loss(model, shuffled)
    assert int(plain.tokens) == 8 and torch.allclose(plain.total, moved.total, atol=1e-5)
    with pytest.raises(LlmkitError, match="permutation"):
        clip_contrastive_loss(model, dict(batch, labels=torch.zeros(8, dtype=torch.long)))


def test_clip_learns_digits_and_classifies_unseen_captions(tmp_path, one_thread) -> None:
    """The one loop, 100 steps on real digits with generated captions: the contrastive loss falls and zero-shot
    accuracy with caption templates training never used is above chance (10%)."""
    model, tokenizer = tiny_digit_clip()
    digits = load_digits_split()
    pixels, labels = digit_pixels(digits.test_images), torch.from_numpy(digits.test_labels)
    before = zero_shot_accuracy(model, tokenizer, pixels, labels, UNSEEN_TEMPLATES)
    settings = TrainSettings(max_steps=100, batch_size=64, lr=1e-3, warmup_steps=5, eval_every=0, log_every=10,
                             checkpoint_every=100, device="cpu", betas=(0.9, 0.98), weight_decay=0.0)
    batches = DigitBatches(digits.train_images, digits.train_labels, captions=tokenizer)
    result = train(model, clip_contrastive_loss, batches, settings, tmp_path, tokenizer=tokenizer)
    assert result.tokens == 100 * 64  # the loop counts image-caption pairs
    assert sum(result.losses[-10:]) / 10 < 0.95 * sum(result.losses[:10]) / 10  # bounded by log(6): same-digit pairs
    after = zero_shot_accuracy(model.eval(), tokenizer, pixels, labels, UNSEEN_TEMPLATES)
    assert after > 0.3 and after > before + 0.1, (before, after)
    reloaded = load_model(result.checkpoint)  # the loop's checkpoint is a whole llmkit CLIP (ClipConfig + tokenizer)
    ids = encode_captions(tokenizer, ["a drawing of a four", "the number 9"], 48)
    with torch.no_grad():
        assert torch.equal(reloaded(pixels[:3], ids), model(pixels[:3], ids))


def test_caption_without_eos_is_one_error() -> None:
    model, tokenizer = tiny_digit_clip()
    with pytest.raises(LlmkitError, match="no EOS"):
        model.text_embeddings(torch.tensor([tokenizer.encode("a seven")]))


def test_clip_config_round_trips_and_names_bad_fields(tmp_path) -> None:
    model, _ = tiny_digit_clip()
    model.config.save(tmp_path / "config.json")
    assert ClipConfig.load(tmp_path / "config.json") == model.config
    data = model.config.to_dict()
    data["vision"]["n_labels"] = 3
    with pytest.raises(LlmkitError, match="vision tower"):
        ClipConfig(**data)


def test_clip_cli_classifies_and_refuses_bad_inputs(tmp_path, capsys) -> None:
    from PIL import Image

    from llmkit.data.images import processing_for

    model, tokenizer = tiny_digit_clip()
    save_model(model.eval(), tmp_path / "clip", tokenizer)
    processing_for(1, 8).save(tmp_path / "clip")
    digits = load_digits_split()
    Image.fromarray(digits.test_images[0]).save(tmp_path / "digit.png")
    image = f"[{tmp_path / 'digit.png'}]"
    code, out, err = run_cli(capsys, "clip", "classify", "--model", str(tmp_path / "clip"), "--labels",
                             "[a drawing of a zero, a drawing of a one]", "--images", image, "--device", "cpu")
    assert code == 0, err
    ids = encode_captions(tokenizer, ["a drawing of a zero", "a drawing of a one"], 48)
    with torch.no_grad():
        probability = model(digit_pixels(digits.test_images[:1]), ids).softmax(-1)[0]
    assert f"'a drawing of a zero' {probability[0].item():.1%}" in out
    for argv, flag in (
        (["--labels", "[]", "--images", image], "--labels"),
        (["--labels", "[a cat]", "--images", f"[{tmp_path / 'missing.png'}]"], "--images"),
    ):
        code, err = cli_status(capsys, "clip", "classify", "--model", str(tmp_path / "clip"), *argv)
        assert code == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1, err
    vit = tmp_path / "vit"
    from llmkit.models.vision import ImageClassifier, vit_config

    save_model(ImageClassifier(vit_config(d_model=16, n_layers=1, n_heads=2), 10), vit)
    code, err = cli_status(capsys, "clip", "classify", "--model", str(vit), "--labels", "[a cat]", "--images", image)
    assert code == 2 and err.startswith("error: --model") and "vision" in err and err.count("\n") == 1
