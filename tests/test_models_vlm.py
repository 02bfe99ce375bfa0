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


def test_resampler_tokens_are_pooled_image_features() -> None:
    """No constant path before the final norm (models/vlm.py): the latents' keys and values are the features only,
    the projection has no bias, so a feature set made of one repeated vector gives the same tokens as that single
    vector (with the latents among the keys and values, repeating the vector would shift the attention's weights)."""
    config = tiny_decoder().config
    torch.manual_seed(0)
    resampler = PerceiverResampler(config, vision_width=16, n_latents=4, n_layers=1)
    assert resampler.input_proj.bias is None
    one = torch.randn(2, 1, 16)
    torch.testing.assert_close(resampler(one.expand(2, 6, 16)), resampler(one), rtol=1e-5, atol=1e-5)
    different = resampler(torch.randn(2, 6, 16))
    assert (different[0] - different[1]).abs().max() > 1e-3  # two images, two sets of tokens


def test_flamingo_gates_learn_at_their_own_rate() -> None:
    from llmkit.models.vlm import GATE_LR_SCALE
    from llmkit.train.optim import build_optimizer

    model, _ = flamingo(every=1)
    optimizer = build_optimizer(model, lr=1e-3)
    gates = {id(p) for layer in model.gated_layers() for p in (layer.gated.attn_gate, layer.gated.mlp_gate)}
    for group in optimizer.param_groups:
        in_group = {id(p) for p in group["params"]}
        assert not in_group or in_group <= gates or not in_group & gates
        assert group["lr"] == pytest.approx(1e-3 * (GATE_LR_SCALE if in_group and in_group <= gates else 1.0))
    assert gates <= {id(p) for group in optimizer.param_groups for p in group["params"]}


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
    # a tokenizer with BOS starts every row and prompt with it (whatever its add_bos rule): no image at position 0
    with_bos = byte_tokenizer(specials=["<s>"], bos_id=256, eos_id=0, pad_id=0)
    batch = VLMBatches(images8, labels, with_bos, marker_id=257, max_shots=2)(0, 4)
    assert batch["input_ids"][:, 0].tolist() == [256] * 4 and batch["input_ids"][:, 1].tolist() == [257] * 4
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    assert few_shot_ids(with_bos, [3], marker_id=257)[:2] == [256, 257]
    assert digit_named(" this is a handwritten 7.") == 7 and digit_named("it is three") == 3 and digit_named("no") is None


def caption_language_model(tokenizer, split, marker: int, tokens_per_image: int) -> torch.nn.Module:
    """tiny-llama trained for a few seconds on the caption rows with each image's placeholders written as its digit
    (a language model that reads the digit from the context and captions it; random ones ignore their context)."""
    from llmkit.train.loop import train
    from llmkit.train.objectives import causal_lm_loss
    from llmkit.train.settings import TrainSettings

    rows = VLMBatches(split.train_images, split.train_labels, tokenizer, marker, tokens_per_image)

    def text_batches(position: int, batch_size: int, rank: int = 0, world: int = 1) -> dict:
        batch = rows(position, batch_size)
        digits = torch.tensor([ord(str(int(d))) for d in split.train_labels])[
            [rows._sample(position + i) for i in range(batch_size)]]
        ids = torch.where(batch["input_ids"] == marker, digits[:, None], batch["input_ids"])
        return {"input_ids": ids, "labels": batch["labels"]}

    decoder = tiny_decoder()
    settings = TrainSettings(max_steps=60, batch_size=16, lr=1e-2, warmup_steps=5, log_every=60, checkpoint_every=60,
                             keep_last=1, device="cpu")
    import tempfile

    with tempfile.TemporaryDirectory() as run:
        train(decoder, causal_lm_loss, text_batches, settings, run)
    return decoder.eval()


@pytest.mark.parametrize("style", ["flamingo", "llava"])
def test_short_training_on_digits_lowers_the_caption_loss(style, tmp_path) -> None:
    """Flamingo around a random tiny decoder: the gated layers learn the captions' bytes. LLaVA around a tiny decoder
    first taught to caption rows with the digit written at the placeholders: the projector learns embeddings that
    decoder reads (a random decoder barely reads its context at all: the loss stays at log(256))."""
    from llmkit.data.digits import load_digits_split
    from llmkit.models.vlm import build_vlm
    from llmkit.train.loop import train
    from llmkit.train.objectives import vlm_caption_loss
    from llmkit.train.settings import TrainSettings

    tokenizer = byte_tokenizer(eos_id=0, pad_id=0)
    split = load_digits_split()
    marker = 256  # tiny-llama's vocab_size: image_token_id
    decoder = caption_language_model(tokenizer, split, marker, 5) if style == "llava" else tiny_decoder()
    vit = tiny_vit()
    torch.manual_seed(0)
    model = build_vlm(decoder, vit, VLMConfig(style=style, n_latents=2, resampler_layers=1, cross_attn_every=1))
    assert image_token_id(model.decoder) == marker
    per_image = model.tokens_per_image if style == "llava" else 1
    batches = VLMBatches(split.train_images, split.train_labels, tokenizer, marker, per_image,
                         max_shots=1 if style == "flamingo" else 0)
    settings = TrainSettings(max_steps=60, batch_size=16, lr=1e-2, warmup_steps=3, log_every=10, checkpoint_every=60,
                             keep_last=1, device="cpu")
    result = train(model, vlm_caption_loss, batches, settings, tmp_path / "run")
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("resampler.", "image_embed", "projector.")) or ".gated." in name
                           for name in trained)


def test_vlm_save_load_round_trip(tmp_path) -> None:
    from llmkit.checkpoints import save_model
    from llmkit.commands.vlm import load_vlm, save_vlm
    from llmkit.models.vlm import build_vlm

    decoder, vit = tiny_decoder(), tiny_vit()
    tokenizer = byte_tokenizer(eos_id=0, pad_id=0)
    save_model(decoder, tmp_path / "lm", tokenizer)
    save_model(vit, tmp_path / "vit")
    torch.manual_seed(7)
    model = build_vlm(copy.deepcopy(decoder), copy.deepcopy(vit), VLMConfig(n_latents=3, cross_attn_every=1))
    for layer in model.gated_layers():
        layer.gated.attn_gate.data.fill_(0.3)
    save_vlm(model, tmp_path / "vlm", tmp_path / "lm", tmp_path / "vit")
    loaded, _ = load_vlm(tmp_path / "vlm")
    ids = torch.tensor([[image_token_id(decoder), 5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, images(1, 1)), model.eval()(ids, images(1, 1)), atol=1e-6, rtol=0)


def test_vlm_cli_bad_inputs(tmp_path, capsys) -> None:
    from tests.helpers import cli_status

    (tmp_path / "empty").mkdir()
    cases = [
        (["vlm", "train", "--steps", "0"], "--steps"),
        (["vlm", "train", "--max_shots", "-1"], "--max_shots"),
        (["vlm", "ask", "--model", str(tmp_path / "empty")], "--model"),
        (["vlm", "ask", "--shots", "-2"], "--shots"),
    ]
    for argv, flag in cases:
        code, err = cli_status(capsys, *argv)
        assert code == 2 and err.startswith(f"error: {flag}") and err.count("\n") == 1, err
    code, err = cli_status(capsys, "vlm", "train", "--style", "clip")
    assert code == 2 and "style" in err


def greedy_without_cache(model, prompt: list[int], pixels: torch.Tensor, n_tokens: int) -> list[int]:
    """Greedy tokens by re-running the whole sequence each step (the reference for cached decoding)."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n_tokens):
            token = int(model(ids, pixels)[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


@pytest.mark.parametrize("style", ["flamingo", "llava"])
def test_cached_caption_decoding_matches_full_recomputation(style) -> None:
    from llmkit.commands.vlm import generate_captions
    from llmkit.data.vlm_data import few_shot_ids
    from llmkit.models.vlm import build_vlm

    tokenizer = byte_tokenizer(eos_id=0, pad_id=0)
    torch.manual_seed(0)
    model = build_vlm(tiny_decoder(), tiny_vit(), VLMConfig(style=style, n_latents=2, cross_attn_every=1)).eval()
    for layer in getattr(model, "gated_layers", list)():
        layer.gated.attn_gate.data.fill_(1.0)
        layer.gated.mlp_gate.data.fill_(1.0)
    per_image = model.tokens_per_image if style == "llava" else 1
    shots = [3] if style == "flamingo" else []
    prompts = [few_shot_ids(tokenizer, shots, 256, per_image), few_shot_ids(tokenizer, shots, 256, per_image,
                                                                           question="Which?")]  # two lengths: padding
    pixels = images(2, len(shots) + 1)
    captions = generate_captions(model, tokenizer, prompts, pixels, max_new_tokens=6)
    for row, (prompt, caption) in enumerate(zip(prompts, captions)):
        expected = tokenizer.decode(greedy_without_cache(model, prompt, pixels[row : row + 1], 6)).split("\n")[0]
        assert caption == expected


@pytest.mark.slow
def test_flamingo_on_smollm2_with_closed_gates_is_smollm2(smollm2_float, smollm2_tokenizer) -> None:
    tokenizer = smollm2_tokenizer
    decoder = copy.deepcopy(smollm2_float)  # FlamingoVLM wraps the decoder's blocks in place; the fixture is shared
    text = torch.tensor([tokenizer.encode("A handwritten digit, captioned:", add_bos=False)])
    with torch.no_grad():
        expected = decoder(text)
        torch.manual_seed(0)
        model = FlamingoVLM(decoder, tiny_vit(), VLMConfig(n_latents=4, resampler_layers=1, cross_attn_every=15))
        assert len(model.gated_layers()) == 2  # before blocks 0 and 15 of 30
        assert torch.equal(model(text), expected)
        ids = torch.tensor([few_shot_ids(tokenizer, [3], image_token_id(decoder))])
        embeds = model.embed(ids)
        unwrapped = [layer.block for layer in model.gated_layers()]
        with_images = model(ids, images(1, 2))
        for index, block in zip(range(0, 30, 15), unwrapped):  # the same decoder without its gated layers
            decoder.blocks[index] = block
        assert torch.equal(with_images, decoder.head(decoder.hidden_states(None, inputs_embeds=embeds)))
