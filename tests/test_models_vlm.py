"""Flamingo- and LLaVA-style vision-language models (llmkit/models/vlm.py) on tiny decoders and ViTs built here."""

from __future__ import annotations

import copy

import pytest
import torch

from llmkit.data.batch import IGNORE_INDEX
from llmkit.data.vlm_data import VLMBatches, digit_named, encode_interleaved, few_shot_ids
from llmkit.models.vision import ViT, vit_config
from llmkit.models.vlm import (
    FlamingoVLM,
    LlavaVLM,
    PerceiverResampler,
    VLMConfig,
    image_token_id,
    latest_image,
    media_mask,
)
from tests.helpers import byte_tokenizer, tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vit(seed: int = 1) -> ViT:
    torch.manual_seed(seed)
    return ViT(vit_config(n_labels=None, d_model=16, n_layers=1, n_heads=2, patch_size=4)).eval()


def flamingo(every: int = 1, seed: int = 2) -> tuple[FlamingoVLM, torch.nn.Module]:
    """A Flamingo model around a tiny decoder, and an untouched copy of that decoder (the reference)."""
    decoder = tiny_decoder()
    reference = copy.deepcopy(decoder)
    torch.manual_seed(seed)
    return FlamingoVLM(decoder, tiny_vit(), VLMConfig(n_latents=3, resampler_layers=2, cross_attn_every=every)), \
        reference


def images(batch: int, count: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, count, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_flamingo_with_closed_gates_is_the_frozen_decoder_exactly() -> None:
    model, reference = flamingo()
    marker = image_token_id(model.decoder)
    text = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(text), reference(text))  # no images
        with_images = text.clone()
        with_images[:, [2, 7]] = marker
        embeds = model.embed(with_images)  # markers take the learned <image> embedding, other tokens the decoder's
        expected = reference.head(reference.hidden_states(None, inputs_embeds=embeds))
        assert torch.equal(model(with_images, images(2, 2)), expected)
        for layer in model.gated_layers():  # opened gates: the images now change the logits
            layer.gated.attn_gate.data.fill_(0.5)
        assert not torch.allclose(model(with_images, images(2, 2)), expected, atol=1e-4)


def test_flamingo_trains_only_the_new_parts() -> None:
    model, _ = flamingo(every=2)
    text = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    text[:, 0] = image_token_id(model.decoder)
    for layer in model.gated_layers():  # closed gates pass no gradient to the layers behind them: open them a little
        layer.gated.attn_gate.data.fill_(0.1)
        layer.gated.mlp_gate.data.fill_(0.1)
    model(text, images(2, 1)).sum().backward()
    new = ("resampler.", "image_embed", ".gated.")
    for name, parameter in model.named_parameters():
        if any(part in name for part in new):
            assert parameter.requires_grad and parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name
        else:
            assert not parameter.requires_grad and parameter.grad is None, name
    assert len(model.gated_layers()) == 1  # tiny-llama has 2 blocks: one gated layer, before block 0


def test_resampler_gives_a_fixed_number_of_tokens() -> None:
    config = tiny_decoder().config
    resampler = PerceiverResampler(config, vision_width=16, n_latents=5, n_layers=2)
    for n_features in (1, 7, 50):
        assert resampler(torch.randn(3, n_features, 16)).shape == (3, 5, config.d_model)


def test_media_mask_attends_only_to_the_latest_preceding_image() -> None:
    marker = 99
    ids = torch.tensor([[1, 2, marker, 3, 4, marker, 5, 6]])
    latest = latest_image(ids, marker)
    assert latest.tolist() == [[-1, -1, 0, 0, 0, 1, 1, 1]]
    allowed, has_media = media_mask(latest, n_images=2, tokens_per_image=3)  # (1, 1, 8, 6)
    assert has_media[0, :, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    for t in range(2, 8):
        image = 0 if t < 5 else 1
        assert allowed[0, 0, t].tolist() == [i // 3 == image for i in range(6)]  # never a later image, never an older
    assert latest_image(torch.tensor([[7, 8]]), marker, torch.tensor([2])).tolist() == [[1, 1]]  # cached decoding


def test_flamingo_text_never_sees_a_later_image() -> None:
    model, _ = flamingo()
    for layer in model.gated_layers():
        layer.gated.attn_gate.data.fill_(1.0)
    marker = image_token_id(model.decoder)
    ids = torch.tensor([[5, marker, 6, 7, marker, 8, 9]])
    first, second = images(1, 2, seed=4), images(1, 2, seed=5)
    second[:, 0] = first[:, 0]  # same first image, a different second one
    with torch.no_grad():
        a, b = model(ids, first), model(ids, second)
    assert torch.equal(a[:, :4], b[:, :4])  # tokens before the second marker: unchanged
    assert not torch.allclose(a[:, 4:], b[:, 4:], atol=1e-5)


def llava(projector: str = "mlp") -> tuple[LlavaVLM, torch.nn.Module]:
    decoder = tiny_decoder()
    reference = copy.deepcopy(decoder)
    torch.manual_seed(2)
    return LlavaVLM(decoder, tiny_vit(), VLMConfig(style="llava", projector=projector)), reference


def test_llava_splices_the_projected_features_at_the_placeholders() -> None:
    model, reference = llava()
    n = model.tokens_per_image  # 4 patches + [CLS]
    marker = image_token_id(model.decoder)
    ids = torch.tensor([[1, 2] + [marker] * n + [3, 4] + [marker] * n + [5]])
    pixels = images(1, 2)
    with torch.no_grad():
        embeds = model.embed(ids, pixels)
        projected = model.projector(model.vision.features(pixels[0]))  # (2, n, d)
        assert torch.equal(embeds[0, 2 : 2 + n], projected[0]) and torch.equal(embeds[0, 4 + n : 4 + 2 * n], projected[1])
        text = ids != marker
        assert torch.equal(embeds[text], reference.embed(ids[text]))
        logits = model(ids, pixels)
        assert torch.equal(logits, reference.head(reference.hidden_states(None, inputs_embeds=embeds)))
    with pytest.raises(Exception, match="placeholders"):
        model(ids[:, :-3], pixels)  # a placeholder short


def test_llava_with_zero_projector_and_no_images_is_the_decoder() -> None:
    model, reference = llava("linear")
    torch.nn.init.zeros_(model.projector[0].weight)
    torch.nn.init.zeros_(model.projector[0].bias)
    marker = image_token_id(model.decoder)
    text = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        assert torch.equal(model(text), reference(text))  # no image tokens: the decoder on the text
        ids = torch.cat([text, torch.full((1, model.tokens_per_image), marker), text], dim=1)
        embeds = model.embed(ids, images(1, 1))
        assert torch.equal(embeds[0, 5 : 5 + model.tokens_per_image], torch.zeros(model.tokens_per_image, 64))
        # text before the image: the decoder's logits (to float rounding: SDPA sums a longer sequence in other blocks)
        torch.testing.assert_close(model(ids, images(1, 1))[:, :5], reference(text), atol=1e-5, rtol=0)


def test_vlm_batches_label_only_captions() -> None:
    tokenizer = byte_tokenizer(eos_id=0, pad_id=0)
    images8 = (torch.rand(20, 8, 8) * 255).to(torch.uint8).numpy()
    labels = torch.arange(20).remainder(10).numpy()
    batch = VLMBatches(images8, labels, tokenizer, marker_id=256, tokens_per_image=2, max_shots=2)(0, 4)
    M = batch["pixel_values"].shape[1]
    assert batch["pixel_values"].shape == (4, M, 1, 8, 8)
    for row, targets in zip(batch["input_ids"], batch["labels"]):
        assert int((row == 256).sum()) == 2 * M  # two placeholders per image
        caption = tokenizer.decode([t for t in targets.tolist() if t != IGNORE_INDEX])
        assert caption.count("this is a handwritten") == M and "What digit" not in caption
    prompt = few_shot_ids(tokenizer, [3], marker_id=256)
    assert prompt.count(256) == 2 and tokenizer.decode([t for t in prompt if t != 256]).endswith("What digit is this?")
    assert encode_interleaved(tokenizer, "a<image>b", 256, 3) == [97, 256, 256, 256, 98]
    assert digit_named(" this is a handwritten 7.") == 7 and digit_named("it is three") == 3 and digit_named("no") is None
