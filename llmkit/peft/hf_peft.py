"""Hugging Face PEFT adapter directories for LoRA, in and out, so adapters move between llmkit and peft.

A PEFT LoRA directory holds adapter_config.json (peft's LoraConfig: r, lora_alpha, target_modules, ...) and
adapter_model.safetensors with one A, one B (and for DoRA one magnitude) tensor per adapted linear layer, named by
the transformers module path: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight. llmkit's module
names translate through the checkpoint key map of `llmkit.checkpoints.hf` (the one the model weights use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.checkpoints.hf import to_hf_state_dict
from llmkit.checkpoints.hf_config import GPT2, hf_architecture
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object
from llmkit.peft.core import METHOD_KEY
from llmkit.peft.lora import (
    LoraSettings,
    adapter_names,
    add_adapter,
    apply_lora,
    linear_layers,
    lora_layers,
    set_adapter,
)

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PICKLE_FILE = "adapter_model.bin"
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM.base_model (LoraModel).model (the transformers model)
LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"
MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")  # peft >= 0.12 writes the first
PEFT_TYPE = "LORA"
TASK_TYPE = "CAUSAL_LM"
# LoraConfig fields that change what the tensors mean, with the value llmkit supports (peft's default)
UNSUPPORTED_FIELDS = {"bias": "none", "lora_bias": False, "modules_to_save": None, "rank_pattern": {},
                      "alpha_pattern": {}, "layer_replication": None, "target_parameters": None,
                      "trainable_token_indices": None, "use_qalora": False, "alora_invocation_tokens": None}
PARTS = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude"}  # file part -> LoraLinear's tensors
PROBE = "lora_A"  # a parameter name with no place in a model checkpoint: to_hf_state_dict only renames its module


def export_peft_lora(model: nn.Module, directory: str | Path, base_model_name_or_path: str | None = None,
                     adapter_name: str | None = None) -> Path:
    """Write a LoRA adapter (the active one unless `adapter_name`) as a PEFT directory that
    `peft.PeftModel.from_pretrained(transformers_model, directory)` loads."""
    layers = lora_layers(model)
    if not layers:
        raise LlmkitError("the model has no LoRA adapter to export; apply_lora(model, settings) and train it first")
    name = adapter_name or next((layer.active for layer in layers.values() if layer.active), None)
    if name not in adapter_names(model):
        raise LlmkitError(f"the model has no adapter {name!r} to export; it has {adapter_names(model)}: pass "
                          "adapter_name")
    adapted = {module: layer for module, layer in layers.items() if name in layer.settings}
    hf_names = hf_module_names(model)
    tensors: dict[str, torch.Tensor] = {}
    for module, layer in adapted.items():
        if hf_names.get(module) is None:
            raise LlmkitError(f"{module} has no module of its own in a {hf_architecture(model.config)} checkpoint "
                              "(transformers fuses it with its neighbours), so peft cannot hold its LoRA; target other "
                              "layers or save with llmkit.peft.core.save_adapter")
        key = PEFT_PREFIX + hf_names[module]
        tensors[key + LORA_A_SUFFIX] = layer.lora_A[name].detach()
        tensors[key + LORA_B_SUFFIX] = layer.lora_B[name].detach()
        if name in layer.lora_magnitude:
            tensors[key + MAGNITUDE_SUFFIXES[0]] = layer.lora_magnitude[name].detach()
    settings = next(iter(adapted.values())).settings[name]
    record = _peft_config(model, settings, hf_names, sorted(hf_names[module] for module in adapted),
                          base_model_name_or_path)
    directory = Path(directory)
    tensors = {key: tensor.contiguous().cpu() for key, tensor in tensors.items()}
    atomic_write(directory / PEFT_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_text(directory / PEFT_CONFIG_FILE, json.dumps(record, indent=2) + "\n")
    return directory


def _peft_config(model: nn.Module, settings: LoraSettings, hf_names: dict[str, str | None], modules: list[str],
                 base: str | None) -> dict[str, Any]:
    """peft's LoraConfig as a dict; target_modules are name suffixes when they select exactly `modules` (the HF
    names of the adapted layers), else those full names."""
    suffixes = sorted({module.rsplit(".", 1)[-1] for module in modules})
    selected = sorted(hf for hf in hf_names.values() if hf and hf.rsplit(".", 1)[-1] in suffixes)
    alpha = int(settings.alpha) if float(settings.alpha).is_integer() else settings.alpha
    return {
        "peft_type": PEFT_TYPE, "task_type": TASK_TYPE, "base_model_name_or_path": base,
        "r": settings.rank, "lora_alpha": alpha, "lora_dropout": settings.dropout,
        "target_modules": suffixes if selected == modules else modules,
        "use_rslora": settings.rslora, "use_dora": settings.dora, "init_lora_weights": True, "inference_mode": True,
        "fan_in_fan_out": hf_architecture(model.config) == GPT2,  # GPT-2's Conv1D stores weights (in, out)
        **UNSUPPORTED_FIELDS,
    }


def import_peft_lora(model: nn.Module, directory: str | Path, adapter_name: str = "default") -> nn.Module:
    """Apply a PEFT LoRA adapter to an llmkit model (its transformers original's base weights) and load its tensors;
    on a model that already has adapters it is added as `adapter_name` and made active."""
    directory = Path(directory)
    config_file, weights_file, record = read_peft_config(directory)
    if METHOD_KEY in record:
        raise LlmkitError(f"{config_file} is an llmkit adapter (method {record[METHOD_KEY]!r}), not a PEFT one; load "
                          "it with llmkit's adapter loader instead")
    if record.get("peft_type") != PEFT_TYPE:
        raise LlmkitError(f"{config_file} has peft_type {record.get('peft_type')!r}; only {PEFT_TYPE!r} adapters "
                          "import here")
    for field, supported in UNSUPPORTED_FIELDS.items():
        if record.get(field) not in (None, [], {}, supported):
            raise LlmkitError(f"{config_file} sets {field}={record[field]!r}; llmkit imports plain LoRA/DoRA only "
                              f"({field}={supported!r}): retrain without it or merge it into the base in peft")
    groups = _group_by_module(model, read_peft_weights(directory), weights_file)
    # targets: the exact layers the file adapts (peft's target_modules may be a regex or limited by layers_to_transform)
    settings = LoraSettings(rank=record.get("r", 8), alpha=float(record.get("lora_alpha", 8)),
                            dropout=float(record.get("lora_dropout", 0.0)), rslora=bool(record.get("use_rslora")),
                            dora=bool(record.get("use_dora")), adapter_name=adapter_name, targets=tuple(groups))
    _check_shapes(linear_layers(model), groups, settings, weights_file)  # before the model changes
    if lora_layers(model):
        set_adapter(add_adapter(model, settings), adapter_name)
    else:
        apply_lora(model, settings)
    layers = lora_layers(model)
    with torch.no_grad():
        for module, parts in groups.items():
            for part, (_, tensor) in parts.items():
                getattr(layers[module], PARTS[part])[adapter_name].copy_(tensor)
    return model


def _check_shapes(layers: dict[str, nn.Module], groups: dict[str, dict[str, tuple[str, torch.Tensor]]],
                  settings: LoraSettings, weights_file: Path) -> None:
    """Each adapted layer has A (r, in), B (out, r) and, exactly when use_dora, a magnitude (out,)."""
    for module, parts in groups.items():
        layer = layers[module]
        shapes = {"A": (settings.rank, layer.in_features), "B": (layer.out_features, settings.rank)}
        if settings.dora:
            shapes["magnitude"] = (layer.out_features,)
        if set(parts) != set(shapes):
            raise LlmkitError(f"{weights_file} holds {sorted(parts)} for {module} but use_dora={settings.dora} needs "
                              f"{sorted(shapes)}; the file and {PEFT_CONFIG_FILE} disagree: export the adapter again")
        for part, (key, tensor) in parts.items():
            if tuple(tensor.shape) != shapes[part]:
                raise LlmkitError(f"{key} in {weights_file} has shape {tuple(tensor.shape)}, {module} with "
                                  f"r={settings.rank} needs {shapes[part]}; the adapter belongs to another base model "
                                  f"or r in {PEFT_CONFIG_FILE} is wrong")


def read_peft_config(directory: Path) -> tuple[Path, Path, dict[str, Any]]:
    """(config file, weights file, config record) of a peft adapter directory, any peft_type."""
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not a PEFT adapter directory; pass the folder holding {PEFT_CONFIG_FILE} "
                          f"and {PEFT_WEIGHTS_FILE}")
    config_file = directory / PEFT_CONFIG_FILE
    return config_file, directory / PEFT_WEIGHTS_FILE, read_json_object(config_file)


def read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a peft adapter directory's safetensors file; a pickled-only adapter is refused."""
    weights_file = directory / PEFT_WEIGHTS_FILE
    if not weights_file.is_file() and (directory / PEFT_PICKLE_FILE).exists():
        raise LlmkitError(f"{directory} holds only {PEFT_PICKLE_FILE} (pickled); llmkit never unpickles files "
                          f"(loading one can run arbitrary code): save the adapter again with peft's default "
                          f"safe_serialization=True to get {PEFT_WEIGHTS_FILE}")
    try:
        return load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{weights_file} is missing or unreadable ({error}); save the adapter again") from None


def _group_by_module(model: nn.Module, tensors: dict[str, torch.Tensor],
                     weights_file: Path) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """llmkit module name -> {"A" | "B" | "magnitude": (PEFT key, tensor)}."""
    to_llmkit = {hf: module for module, hf in hf_module_names(model).items() if hf is not None}
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        suffix = next((s for s in (LORA_A_SUFFIX, LORA_B_SUFFIX, *MAGNITUDE_SUFFIXES) if key.endswith(s)), None)
        if not key.startswith(PEFT_PREFIX) or suffix is None:
            raise LlmkitError(f"unexpected tensor {key} in {weights_file}: a PEFT LoRA file holds "
                              f"{PEFT_PREFIX}<module>{LORA_A_SUFFIX} / {LORA_B_SUFFIX} (and DoRA's "
                              f"{MAGNITUDE_SUFFIXES[0]}) only")
        hf_module = key[len(PEFT_PREFIX):-len(suffix)]
        if hf_module not in to_llmkit:
            raise LlmkitError(f"{key} in {weights_file} adapts {hf_module}, which is no linear layer llmkit maps in "
                              f"this {hf_architecture(model.config)} model; import the adapter onto the base model "
                              "it was trained for")
        part = "A" if suffix == LORA_A_SUFFIX else "B" if suffix == LORA_B_SUFFIX else "magnitude"
        groups.setdefault(to_llmkit[hf_module], {})[part] = (key, tensor)
    if not groups:
        raise LlmkitError(f"{weights_file} holds no tensors; export the adapter again")
    return groups


def hf_module_names(model: nn.Module) -> dict[str, str | None]:
    """llmkit linear layer name -> its transformers module name (None where transformers fuses it with others),
    through the checkpoint key map of `llmkit.checkpoints.hf`."""
    config = getattr(model, "config", None)
    if config is None:
        raise LlmkitError(f"a {type(model).__name__} has no llmkit config; PEFT files map names of a Decoder's "
                          "layers, so pass a Decoder")
    architecture = hf_architecture(config)
    names: dict[str, str | None] = {}
    for module in linear_layers(model):
        try:
            renamed = to_hf_state_dict(config, {f"{module}.{PROBE}": torch.empty(0)}, architecture)
        except LlmkitError:
            renamed = {}  # a layer the checkpoint has no place for
        names[module] = next(iter(renamed), "").removesuffix(f".{PROBE}") or None
    return names
