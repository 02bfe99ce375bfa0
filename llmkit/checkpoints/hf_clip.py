"""Hugging Face CLIP checkpoints (CLIPModel) -> llmkit CLIP, and back (`clip_config_dict` + `to_hf_clip_state_dict`,
written by `llmkit.checkpoints.hf.export_hf`).

One explicit key map per tower from the names stored on disk to llmkit's; export inverts it. The vision tower's
[CLS] vector (class_embedding) and position table (position_embedding.weight) have llmkit's shapes already.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from llmkit.checkpoints.hf_config import CONFIG_FILE, REQUIRED, read_field
from llmkit.checkpoints.hf_files import read_mapped_tensors
from llmkit.checkpoints.hf_vit import HIDDEN_ACTS, hidden_activation
from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.models.clip import CLIP, ClipConfig, clip_text_config, clip_vision_config

CLIP_MODEL = "CLIPModel"
CLIP_MODEL_TYPE = "clip"
# HF module -> llmkit module inside each tower's encoder; "{i}" is the layer index
LAYER_MODULES = {
    "encoder.layers.{i}.layer_norm1": "blocks.{i}.attn_norm",
    "encoder.layers.{i}.self_attn.q_proj": "blocks.{i}.attn.q_proj",
    "encoder.layers.{i}.self_attn.k_proj": "blocks.{i}.attn.k_proj",
    "encoder.layers.{i}.self_attn.v_proj": "blocks.{i}.attn.v_proj",
    "encoder.layers.{i}.self_attn.out_proj": "blocks.{i}.attn.o_proj",
    "encoder.layers.{i}.layer_norm2": "blocks.{i}.mlp_norm",
    "encoder.layers.{i}.mlp.fc1": "blocks.{i}.mlp.up_proj",
    "encoder.layers.{i}.mlp.fc2": "blocks.{i}.mlp.down_proj",
}
TEXT_MODULES = {"embeddings.token_embedding": "embed", "embeddings.position_embedding": "pos_embed",
                "final_layer_norm": "final_norm", **LAYER_MODULES}
VISION_MODULES = {"embeddings.patch_embedding": "patch_embed", "pre_layrnorm": "embed_norm",
                  "post_layernorm": "final_norm", **LAYER_MODULES}
VISION_PARAMETERS = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding.weight": "pos_embed"}
JOINT_PARAMETERS = {"visual_projection.weight": "visual_projection.weight",
                    "text_projection.weight": "text_projection.weight", "logit_scale": "logit_scale"}
SKIPPED = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")  # buffers of older files


# --------------------------------------------------------------------------- config.json -> ClipConfig


def clip_config_from_dict(data: dict[str, Any], config_file: Path) -> ClipConfig:
    """A `ClipConfig` from a CLIPModel config.json's contents (its text_config and vision_config)."""
    if CLIP_MODEL not in (data.get("architectures") or []):
        named = ", ".join(data.get("architectures") or []) or f"model_type {data.get('model_type')!r}"
        raise LlmkitError(f"{config_file} declares architecture {named}, which is not a CLIP llmkit imports; "
                          f"supported: {CLIP_MODEL}")
    text = read_field(data, "text_config", config_file, dict)
    vision = read_field(data, "vision_config", config_file, dict)
    tf = lambda key, kind, default=REQUIRED: read_field(text, key, config_file, kind, default, where="text_config")
    vf = lambda key, kind, default=REQUIRED: read_field(vision, key, config_file, kind, default, where="vision_config")
    name = config_file.parent.name or "clip"
    try:
        text_config = clip_text_config(
            vocab_size=tf("vocab_size", int), eos_id=tf("eos_token_id", int), max_seq_len=tf("max_position_embeddings",
                                                                                             int),
            d_model=tf("hidden_size", int), n_layers=tf("num_hidden_layers", int), n_heads=tf("num_attention_heads", int),
            name=f"{name}-text", d_ff=tf("intermediate_size", int), norm_eps=tf("layer_norm_eps", float, 1e-5),
            gelu_approximate=hidden_activation(text, config_file, "text_config"), bos_id=tf("bos_token_id", int, None),
            pad_id=tf("pad_token_id", int, None))
        vision_config = clip_vision_config(
            image_size=vf("image_size", int, 224), patch_size=vf("patch_size", int, 32),
            n_channels=vf("num_channels", int, 3), d_model=vf("hidden_size", int), n_layers=vf("num_hidden_layers", int),
            n_heads=vf("num_attention_heads", int), name=f"{name}-vision", d_ff=vf("intermediate_size", int),
            norm_eps=vf("layer_norm_eps", float, 1e-5),
            gelu_approximate=hidden_activation(vision, config_file, "vision_config"))
        return ClipConfig(text=text_config, vision=vision_config, projection_dim=read_field(
            data, "projection_dim", config_file, int, 512), logit_scale_init=read_field(
            data, "logit_scale_init_value", config_file, float, 2.6592), name=name, hf_architecture=CLIP_MODEL)
    except LlmkitError as error:
        raise LlmkitError(f"{config_file}: {error}") from None


def clip_config_dict(config: ClipConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The config.json transformers reads for `config` (a CLIPModel), checked to read back as `config`."""
    text, vision = config.text, config.vision
    data = dict(
        architectures=[CLIP_MODEL], model_type=CLIP_MODEL_TYPE, projection_dim=config.projection_dim,
        logit_scale_init_value=config.logit_scale_init, torch_dtype=str(dtype).removeprefix("torch."),
        text_config=dict(vocab_size=text.vocab_size, hidden_size=text.d_model, intermediate_size=text.d_ff,
                         num_hidden_layers=text.n_layers, num_attention_heads=text.n_heads,
                         max_position_embeddings=text.max_seq_len, hidden_act=HIDDEN_ACTS[text.gelu_approximate],
                         layer_norm_eps=text.norm_eps, eos_token_id=text.eos_id, bos_token_id=text.bos_id,
                         pad_token_id=text.pad_id, projection_dim=config.projection_dim, attention_dropout=0.0),
        vision_config=dict(hidden_size=vision.d_model, intermediate_size=vision.d_ff,
                           num_hidden_layers=vision.n_layers, num_attention_heads=vision.n_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size, num_channels=vision.n_channels,
                           hidden_act=HIDDEN_ACTS[vision.gelu_approximate], layer_norm_eps=vision.norm_eps,
                           projection_dim=config.projection_dim, attention_dropout=0.0),
    )
    back = clip_config_from_dict(data, Path(CONFIG_FILE))
    for tower in ("text", "vision"):
        ours, theirs = getattr(config, tower), getattr(back, tower)
        for key, value in ours.to_dict().items():
            if key not in ("name", "extra", "hf_architecture") and value != getattr(theirs, key):
                raise LlmkitError(f"CLIP config {config.name!r} cannot be exported as {CLIP_MODEL}: its config.json "
                                  f"has no way to say {tower}.{key}={value!r}; save it in llmkit's native format")
    return data


# --------------------------------------------------------------------------- key map


def hf_to_llmkit_names(config: ClipConfig) -> dict[str, str]:
    """HF tensor name -> llmkit state-dict name of every CLIP weight."""
    names = dict(JOINT_PARAMETERS)
    for hf_tower, tower, modules, n_layers in (("text_model", "text", TEXT_MODULES, config.text.n_layers),
                                               ("vision_model", "vision", VISION_MODULES, config.vision.n_layers)):
        for hf_module, module in modules.items():
            for i in range(n_layers) if "{i}" in hf_module else [None]:
                for parameter in ("weight", "bias"):
                    names[f"{hf_tower}.{hf_module.format(i=i)}.{parameter}"] = (
                        f"{tower}.{module.format(i=i)}.{parameter}")
    names.update({f"vision_model.{hf}": f"vision.{name}" for hf, name in VISION_PARAMETERS.items()})
    with torch.device("meta"):
        expected = set(CLIP(config).state_dict())
    return {hf: name for hf, name in names.items() if name in expected}


def to_hf_clip_state_dict(config: ClipConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llmkit-named CLIP tensors -> CLIPModel's names."""
    to_hf = {name: hf for hf, name in hf_to_llmkit_names(config).items()}
    return {to_hf[name]: tensor for name, tensor in state.items()}


def load_hf_clip(path: str | Path) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """ClipConfig and llmkit-named state dict of a Hugging Face CLIPModel directory."""
    directory = Path(path)
    config = clip_config_from_dict(read_json_object(directory / CONFIG_FILE), directory / CONFIG_FILE)
    state = read_mapped_tensors(directory, hf_to_llmkit_names(config), lambda name: name in SKIPPED, CLIP_MODEL)
    return config, state

