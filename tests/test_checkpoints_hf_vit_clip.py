"""Hugging Face import and export for ViT (ViTModel, ViTForImageClassification) and CLIP (CLIPModel): an exported
directory loads in transformers with the same outputs, llmkit's own format round-trips, and bad files are one error
naming the file and the key."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llmkit.checkpoints import hf_family, load_config, load_model, save_model
from llmkit.checkpoints.hf import export_hf
from llmkit.errors import LlmkitError
from llmkit.models.clip import CLIP, ClipConfig, clip_text_config, clip_vision_config
from llmkit.models.vision import ImageClassifier, ViT, vit_config

TOLERANCE = 1e-4  # fp32, same operations in another order


def tiny_vit(n_labels: int | None, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    config = vit_config(image_size=8, patch_size=2, n_channels=3, n_labels=n_labels, d_model=32, n_layers=2,
                        n_heads=4, d_ff=48, **overrides)
    return (ImageClassifier(config, n_labels) if n_labels else ViT(config)).eval()


def tiny_clip() -> CLIP:
    torch.manual_seed(0)
    config = ClipConfig(text=clip_text_config(100, eos_id=99, max_seq_len=16, d_model=32, n_layers=2, pad_id=0),
                        vision=clip_vision_config(8, 4, 3, 40, 2), projection_dim=24, name="tiny-clip")
    model = CLIP(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)  # not the default, so the export must carry the trained value
    return model


@pytest.mark.parametrize(("n_labels", "hf_class"), [(None, transformers.ViTModel),
                                                    (4, transformers.ViTForImageClassification)])
def test_exported_vit_loads_in_transformers_with_the_same_outputs(tmp_path, one_thread, n_labels, hf_class) -> None:
    model = tiny_vit(n_labels, gelu_approximate="tanh")
    export_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [hf_class.__name__]
    reference = hf_class.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        output = reference(pixel_values=pixels)
        expected = output.logits if n_labels else output.last_hidden_state
        assert (model(pixels) - expected).abs().max() <= TOLERANCE
    config, state = load_config(tmp_path), load_model(tmp_path).state_dict()
    assert config == model.config.__class__(**{**model.config.to_dict(), "name": tmp_path.name,
                                                "hf_architecture": hf_class.__name__})
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())


def test_exported_clip_loads_in_transformers_with_the_same_outputs(tmp_path, one_thread) -> None:
    model = tiny_clip()
    export_hf(model, tmp_path)
    reference = transformers.CLIPModel.from_pretrained(tmp_path).eval()
    pixels = torch.randn(2, 3, 8, 8)
    ids = torch.tensor([[5, 6, 7, 99, 0], [8, 99, 0, 0, 0], [9, 10, 11, 12, 99]])
    with torch.no_grad():
        output = reference(input_ids=ids, pixel_values=pixels)
        assert (model.image_embeddings(pixels) - output.image_embeds).abs().max() <= TOLERANCE
        assert (model.text_embeddings(ids) - output.text_embeds).abs().max() <= TOLERANCE
        assert (model(pixels, ids) - output.logits_per_image).abs().max() <= TOLERANCE
    assert hf_family(tmp_path) == "clip"
    reloaded = load_model(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[name], tensor) for name, tensor in model.state_dict().items())


def test_native_round_trips(tmp_path) -> None:
    for name, model in (("vit", tiny_vit(None)), ("classifier", tiny_vit(3)), ("clip", tiny_clip())):
        save_model(model, tmp_path / name)
        reloaded = load_model(tmp_path / name)
        assert type(reloaded) is type(model) and reloaded.config == model.config
        assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in model.state_dict().items())
    assert isinstance(load_config(tmp_path / "clip"), ClipConfig)


def test_clip_vision_tower_cannot_be_exported_as_a_vit(tmp_path) -> None:
    tower = tiny_clip().vision
    with pytest.raises(LlmkitError, match="CLIP-style vision tower"):
        export_hf(tower, tmp_path)
    assert not (tmp_path / "config.json").exists()


def test_bad_checkpoints_are_one_error_naming_file_and_key(tmp_path) -> None:
    model = tiny_vit(3)
    export_hf(model, tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(data, patch_size=3)))
    with pytest.raises(LlmkitError, match=r"config\.json: .*image_size=8 must be a positive multiple of patch_size=3"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(data, hidden_act="swish")))
    with pytest.raises(LlmkitError, match="hidden_act='swish' is not supported"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(data))
    tensors = load_file(tmp_path / "model.safetensors")
    save_file({**tensors, "vit.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match="unexpected tensor vit.extra.weight"):
        load_model(tmp_path)
    del tensors["classifier.bias"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(LlmkitError, match="classifier.bias is missing"):
        load_model(tmp_path)


def test_load_model_refuses_another_family(tmp_path) -> None:
    export_hf(tiny_vit(3), tmp_path)
    assert hf_family(tmp_path) == "vision"
    with pytest.raises(LlmkitError, match=r"holds a vision model \(ViT\).*needs a decoder"):
        load_model(tmp_path, arch="decoder")
