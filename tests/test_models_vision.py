"""ViT (llmkit/models/vision.py): numerics against transformers' ViTModel / ViTForImageClassification built from tiny
random configs here, learning on real digits through the one training loop, and the `vision` verbs' bad inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmkit.checkpoints import load_model
from llmkit.data.digits import DigitBatches, digit_pixels, load_digits_split
from llmkit.errors import LlmkitError
from llmkit.models.vision import ImageClassifier, ViT, vit_config
from llmkit.train.loop import train
from llmkit.train.objectives import image_classification_loss
from llmkit.train.settings import TrainSettings
from tests.helpers import cli_status

TOLERANCE = 1e-4  # fp32: same operations in a different order (fused attention kernels) differ by ~1e-6


def hf_vit_config(**overrides: object) -> transformers.ViTConfig:
    values = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=8,
                  patch_size=2, num_channels=3, num_labels=5)
    return transformers.ViTConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def digits():  # noqa: ANN201
    return load_digits_split()


@pytest.mark.parametrize("hf_class", [transformers.ViTModel, transformers.ViTForImageClassification])
@pytest.mark.parametrize("overrides", [{}, {"hidden_act": "gelu_new", "qkv_bias": False, "num_channels": 1}])
def test_imported_vit_matches_transformers(tmp_path, one_thread, hf_class, overrides) -> None:
    torch.manual_seed(0)
    reference = hf_class(hf_vit_config(**overrides)).eval()
    with torch.no_grad():  # random (not zero) [CLS] and positions, so the test sees them
        reference.base_model.embeddings.cls_token.normal_()
        reference.base_model.embeddings.position_embeddings.normal_()
    reference.save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert isinstance(model, ImageClassifier if hf_class is transformers.ViTForImageClassification else ViT)
    pixels = torch.randn(3, reference.config.num_channels, 8, 8)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        ours = model(pixels)
    if hf_class is transformers.ViTModel:
        assert (ours - expected.last_hidden_state).abs().max() <= TOLERANCE
        states = model.hidden_states(pixels)  # before the final norm = transformers' last hidden_states entry
        assert (states - expected.hidden_states[-1]).abs().max() <= TOLERANCE
    else:
        assert (ours - expected.logits).abs().max() <= TOLERANCE


def test_reference_attention_kernel_matches_sdpa(one_thread) -> None:
    torch.manual_seed(0)
    model = ViT(vit_config(n_labels=None, d_model=32, n_layers=2)).eval()
    pixels = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        fast = model(pixels)
        model.kernel = "reference"
        assert (model(pixels) - fast).abs().max() <= TOLERANCE


def test_features_are_cls_then_patches_in_row_major_order(one_thread) -> None:
    """Patch k of the output sees image pixels of patch k: changing only the top-right patch of an image with no
    attention mixing (zero layers is not allowed, so compare the embeddings) moves row 1 + (patches per row - 1)."""
    torch.manual_seed(0)
    model = ViT(vit_config(n_labels=None, patch_size=4, d_model=16, n_layers=1, n_heads=2)).eval()
    pixels = torch.zeros(1, 1, 8, 8)
    changed = pixels.clone()
    changed[0, 0, 0:4, 4:8] = 1.0  # the top-right 4x4 patch
    with torch.no_grad():
        moved = (model.embed(changed) - model.embed(pixels)).abs().sum(-1)[0]  # (N + 1,)
    assert moved.nonzero().flatten().tolist() == [2]
    assert model.features(pixels).shape == (1, 5, 16)


def test_wrong_image_shape_is_one_error() -> None:
    model = ViT(vit_config(n_labels=None, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(LlmkitError, match=r"\(batch, 1, 8, 8\)"):
        model(torch.zeros(2, 3, 8, 8))


def test_vit_learns_digits_through_the_training_loop(tmp_path, one_thread, digits) -> None:
    """A tiny ViT, 60 steps of the one loop on real digits: clearly above chance (10%) on the held-out images."""
    torch.manual_seed(0)
    model = ImageClassifier(vit_config(patch_size=4, d_model=32, n_layers=2, n_heads=4), 10)
    settings = TrainSettings(max_steps=60, batch_size=32, lr=3e-3, warmup_steps=6, eval_every=0, log_every=10,
                             checkpoint_every=60, device="cpu")
    result = train(model, image_classification_loss, DigitBatches(digits.train_images, digits.train_labels, 0,
                                                                  augment=False), settings, tmp_path)
    assert result.tokens == 60 * 32  # the loop counts images
    model.eval()
    with torch.no_grad():
        predictions = model(digit_pixels(digits.test_images)).argmax(-1).numpy()
    assert (predictions == digits.test_labels).mean() > 0.6
    assert result.losses[-1] < 0.75 * result.losses[0]
    reloaded = load_model(result.checkpoint)  # the loop's checkpoint is a complete llmkit ViT classifier
    pixels = digit_pixels(digits.test_images[:4])
    with torch.no_grad():
        assert torch.equal(reloaded(pixels), model(pixels))


def test_digit_batches_are_the_same_at_the_same_position(digits) -> None:
    batches = DigitBatches(digits.train_images, digits.train_labels, seed=3)
    first, again, other = batches(64, 32), batches(64, 32), batches(96, 32)
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["labels"], other["labels"])


def test_vision_cli_bad_inputs(tmp_path, capsys) -> None:
    model_dir = tmp_path / "vit"
    from llmkit.checkpoints import save_model

    save_model(ImageClassifier(vit_config(d_model=16, n_layers=1, n_heads=2), 10), model_dir)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    for argv, flag in (
        (["--model", str(model_dir), "--images", f"[{tmp_path / 'missing.png'}]"], "--images"),
        (["--model", str(model_dir), "--images", f"[{not_image}]"], "--images"),
        (["--model", str(tmp_path / "nowhere"), "--images", f"[{not_image}]"], "--model"),
    ):
        code, err = cli_status(capsys, "vision", "classify", *argv)
        assert code == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1, err
    from llmkit.checkpoints import save_model as save
    from tests.helpers import tiny_decoder

    save(tiny_decoder(), tmp_path / "decoder")
    code, err = cli_status(capsys, "vision", "classify", "--model", str(tmp_path / "decoder"), "--images", "[x.png]")
    assert code == 2 and "--model" in err and "decoder" in err and err.count("\n") == 1


def test_vision_classify_prints_probabilities_of_a_saved_model(tmp_path, capsys) -> None:
    from PIL import Image

    from llmkit.checkpoints import save_model
    from llmkit.data.images import processing_for
    from tests.helpers import run_cli

    torch.manual_seed(0)
    model = ImageClassifier(vit_config(d_model=16, n_layers=1, n_heads=2), 10).eval()
    save_model(model, tmp_path / "vit")
    processing_for(1, 8).save(tmp_path / "vit")
    digits = load_digits_split()
    Image.fromarray(digits.test_images[0]).save(tmp_path / "digit.png")
    code, out, err = run_cli(capsys, "vision", "classify", "--model", str(tmp_path / "vit"), "--images",
                             f"[{tmp_path / 'digit.png'}]", "--top", "2", "--device", "cpu")
    assert code == 0, err
    with torch.no_grad():
        probabilities = model(digit_pixels(digits.test_images[:1])).softmax(-1)[0]
    best = probabilities.argmax().item()
    assert out.startswith(f"{tmp_path / 'digit.png'}: {best} {probabilities[best].item():.1%}")
