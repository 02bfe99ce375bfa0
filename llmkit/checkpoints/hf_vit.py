"""Hugging Face ViT checkpoints (ViTModel, ViTForImageClassification) -> llmkit ViT / ImageClassifier, and back
(`vit_config_dict` + `to_hf_vit_state_dict`, written by `llmkit.checkpoints.hf.export_hf`).

One explicit key map from Hugging Face tensor names (as stored on disk) to llmkit's; export inverts it. The [CLS]
token (1, 1, d) and the position table (1, N + 1, d) lose their leading 1s on import and get them back on export.
The safetensors reading goes through `hf_files.read_mapped_tensors`, shared with BERT and CLIP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoints.hf_config import CONFIG_FILE, REQUIRED, build_config, check_round_trip, read_field
from llmkit.checkpoints.hf_files import read_mapped_tensors
from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.vision import build_vision_model, vit_fields

VIT_MODEL, VIT_CLASSIFIER = "ViTModel", "ViTForImageClassification"
ARCHITECTURES = (VIT_MODEL, VIT_CLASSIFIER)
VIT_MODEL_TYPE = "vit"
BODY_PREFIX = "vit."  # the classifier keeps the ViT under vit.
# HF hidden_act -> llmkit gelu_approximate (ViT and CLIP); its inverse for export
ACTIVATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "quick_gelu": "quick"}
HIDDEN_ACTS = {approximate: name for name, approximate in reversed(ACTIVATIONS.items())}
VIT_NAMES = dict(n_layers="num_hidden_layers", n_heads="num_attention_heads", d_model="hidden_size",
                 d_ff="intermediate_size", norm_eps="layer_norm_eps", image_size="image_size",
                 patch_size="patch_size", n_channels="num_channels", n_labels="num_labels")

# HF module -> llmkit module inside the ViT; "{i}" is the layer index. Parameter suffixes carry over.
BODY_MODULES = {
    "embeddings.patch_embeddings.projection": "patch_embed",
    "encoder.layer.{i}.layernorm_before": "blocks.{i}.attn_norm",
    "encoder.layer.{i}.attention.attention.query": "blocks.{i}.attn.q_proj",
    "encoder.layer.{i}.attention.attention.key": "blocks.{i}.attn.k_proj",
    "encoder.layer.{i}.attention.attention.value": "blocks.{i}.attn.v_proj",
    "encoder.layer.{i}.attention.output.dense": "blocks.{i}.attn.o_proj",
    "encoder.layer.{i}.layernorm_after": "blocks.{i}.mlp_norm",
    "encoder.layer.{i}.intermediate.dense": "blocks.{i}.mlp.up_proj",
    "encoder.layer.{i}.output.dense": "blocks.{i}.mlp.down_proj",
    "layernorm": "final_norm",
}
BODY_PARAMETERS = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed"}
SKIPPED = ("pooler.",)  # ViTModel's tanh pooler: llmkit's classifier reads the [CLS] state itself


# --------------------------------------------------------------------------- config.json -> Config


def vit_config_from_dict(data: dict[str, Any], config_file: Path) -> Config:
    """A vision `Config` from a ViT config.json's contents; the declared class decides the head."""
    architecture = next((name for name in data.get("architectures") or [] if name in ARCHITECTURES), None)
    if architecture is None:
        named = ", ".join(data.get("architectures") or []) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares architecture {named}, which is not a ViT llmkit imports; "
                          f"supported: {', '.join(ARCHITECTURES)}")
    field = lambda key, kind, default=REQUIRED: read_field(data, key, config_file, kind, default)
    n_labels = None
    if architecture == VIT_CLASSIFIER:
        labels = field("id2label", dict, None)
        n_labels = len(labels) if labels else field("num_labels", int, 2)
    fields = vit_fields(
        image_size=field("image_size", int, 224), patch_size=field("patch_size", int, 16),
        n_channels=field("num_channels", int, 3), n_labels=n_labels, d_model=field("hidden_size", int),
        n_layers=field("num_hidden_layers", int), n_heads=field("num_attention_heads", int),
        d_ff=field("intermediate_size", int), name=config_file.parent.name or "vit",
        norm_eps=field("layer_norm_eps", float, 1e-12), qkv_bias=field("qkv_bias", bool, True),
        gelu_approximate=hidden_activation(data, config_file), hf_architecture=architecture)
    return build_config(config_file, VIT_NAMES, **fields)


def hidden_activation(data: dict[str, Any], config_file: Path, where: str = "config") -> str:
    """llmkit's gelu_approximate for a ViT/CLIP config.json's hidden_act."""
    activation = read_field(data, "hidden_act", config_file, str, "gelu", where=where)
    if activation not in ACTIVATIONS:
        raise LlmkitError(f"{config_file}: hidden_act={activation!r} is not supported; llmkit supports "
                          f"{', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[activation]


def vit_config_dict(config: Config, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for a vision `config` (ViTModel, or ViTForImageClassification with
    n_labels), checked to read back as `config`."""
    if config.embed_norm or not config.patch_bias:
        raise LlmkitError(f"config {config.name!r} is a CLIP-style vision tower (pre-layernorm or a bias-free patch "
                          "embedding), which a ViT config.json cannot express; export the whole CLIP model or save "
                          "it in llmkit's native format (--to native)")
    architecture = VIT_CLASSIFIER if config.n_labels is not None else VIT_MODEL
    data: dict[str, Any] = dict(
        architectures=[architecture], model_type=VIT_MODEL_TYPE, hidden_size=config.d_model,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, intermediate_size=config.d_ff,
        hidden_act=HIDDEN_ACTS[config.gelu_approximate], layer_norm_eps=config.norm_eps,
        image_size=config.image_size, patch_size=config.patch_size, num_channels=config.n_channels,
        qkv_bias=config.qkv_bias, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        torch_dtype=str(dtype).removeprefix("torch."),
    )
    if config.n_labels is not None:
        data.update(num_labels=config.n_labels, id2label={str(i): f"LABEL_{i}" for i in range(config.n_labels)},
                    label2id={f"LABEL_{i}": i for i in range(config.n_labels)})
    back = vit_config_from_dict(data, Path(CONFIG_FILE))
    check_round_trip(config, back, architecture)
    return data


# --------------------------------------------------------------------------- key map


def hf_to_llmkit_names(config: Config) -> dict[str, str]:
    """HF tensor name -> llmkit state-dict name of every weight of `config`'s ViT class."""
    classifier = config.n_labels is not None
    hf_prefix, prefix = (BODY_PREFIX, "encoder.") if classifier else ("", "")
    names = {}
    for hf_module, module in BODY_MODULES.items():
        for i in range(config.n_layers) if "{i}" in hf_module else [None]:
            for parameter in ("weight", "bias"):
                names[f"{hf_prefix}{hf_module.format(i=i)}.{parameter}"] = f"{prefix}{module.format(i=i)}.{parameter}"
    names.update({hf_prefix + hf: prefix + name for hf, name in BODY_PARAMETERS.items()})
    if classifier:
        names.update({"classifier.weight": "classifier.weight", "classifier.bias": "classifier.bias"})
    with torch.device("meta"):
        expected = set(build_vision_model(config).state_dict())
    return {hf: name for hf, name in names.items() if name in expected}


def to_hf_vit_state_dict(config: Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmkit-named ViT tensors -> the HF names (and shapes) of `config`'s ViT class."""
    to_hf = {name: hf for hf, name in hf_to_llmkit_names(config).items()}
    return {to_hf[name]: _hf_shape(to_hf[name], tensor) for name, tensor in state.items()}


def _hf_shape(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
    """The [CLS] token (1, 1, d) and position table (1, N + 1, d) carry leading axes of 1 in HF ViT checkpoints."""
    if hf_name.endswith("cls_token"):
        return tensor.view(1, 1, -1)
    return tensor[None] if hf_name.endswith("position_embeddings") else tensor


# --------------------------------------------------------------------------- load


def load_hf_vit(path: str | Path) -> tuple[Config, dict[str, torch.Tensor]]:
    """Config and llmkit-named state dict of a Hugging Face ViT directory (ViTModel -> ViT,
    ViTForImageClassification -> ImageClassifier)."""
    directory = Path(path)
    config = vit_config_from_dict(read_json_object(directory / CONFIG_FILE), directory / CONFIG_FILE)
    names = hf_to_llmkit_names(config)
    skip = lambda name: name.removeprefix(BODY_PREFIX).startswith(SKIPPED)
    state = read_mapped_tensors(directory, names, skip, config.hf_architecture)
    for name in ("cls_token", "pos_embed"):
        for key in (name, f"encoder.{name}"):
            if key in state:
                state[key] = state[key].reshape(state[key].shape[-2:] if name == "pos_embed" else state[key].shape[-1:])
    return config, state
