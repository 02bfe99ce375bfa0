"""llmkit's own checkpoint directory: config.json (a `Config`), model.safetensors, tokenizer files."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write
from llmkit.models.clip import CLIP_ARCH, ClipConfig
from llmkit.models.encoder import encoder_head_of

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_KEY = "llmkit_format"  # stored in the safetensors metadata, marks files llmkit wrote
FORMAT_VERSION = "1"
# Beside config.json in a quantized checkpoint (written and read by llmkit.quant, which sits above this layer):
# the scheme, group size and quantized layers. Its presence means the weights are packed, not float tensors.
QUANTIZATION_FILE = "quantization.json"


def is_native_dir(path: Path) -> bool:
    """A directory whose config.json is an llmkit Config (not a Hugging Face config)."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        return False
    try:
        data = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and ("d_model" in data or data.get("arch") == CLIP_ARCH) and "model_type" not in data


def save_native(config: Config | ClipConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path) -> None:
    """Write config.json and model.safetensors into `out_dir`, each atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state_dict.items()}
    metadata = {FORMAT_KEY: FORMAT_VERSION}
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    config.save(out_dir / CONFIG_FILE)


def load_native_config(path: Path) -> Config | ClipConfig:
    """An llmkit config.json: a `Config`, or a `ClipConfig` when it says arch "clip"."""
    from llmkit.io import read_json_object

    return ClipConfig.load(path) if read_json_object(path).get("arch") == CLIP_ARCH else Config.load(path)


def load_native(path: str | Path) -> tuple[Config | ClipConfig, dict[str, torch.Tensor]]:
    """Read an llmkit checkpoint directory; errors name the file and the fix."""
    path = Path(path)
    if (path / QUANTIZATION_FILE).is_file():
        raise LlmkitError(f"{path} is a quantized llmkit checkpoint (see its {QUANTIZATION_FILE}): its weights are "
                          "packed integers; load it with llmkit.quant.load_quantized(path), as the generate, chat, "
                          "perplexity, evaluate and info verbs do, or write a float copy with "
                          "llmkit.quant.dequantize")
    config = load_native_config(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise LlmkitError(f"{weights} is missing; the checkpoint directory is incomplete (re-save or re-convert it)")
    try:
        state_dict = load_file(str(weights))
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{weights} is not a readable safetensors file ({error}); re-save or re-convert it") from None
    return config, state_dict


def saved_config(model: nn.Module) -> Config | ClipConfig:
    """`model.config` with the encoder head (and label count) of the model's actual class, so a MaskedLM built from
    a config that left encoder_head at "base" still reloads as a MaskedLM."""
    config = model.config
    if config.arch != "encoder":
        return config
    head = encoder_head_of(model)
    classifier = getattr(model, "classifier", None)
    n_labels = classifier.weight.shape[0] if classifier is not None else None
    if (head, n_labels) == (config.encoder_head, config.n_labels):
        return config
    return dataclasses.replace(config, encoder_head=head, n_labels=n_labels)
