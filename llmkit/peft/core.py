"""What every fine-tuning method shares: freezing, the trainable-parameter table, and saving / reading only the
trained part of a model (an adapter directory: adapter.safetensors + adapter_config.json)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object

ADAPTER_WEIGHTS_FILE = "adapter.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
METHOD_KEY = "method"  # adapter_config.json: which method made the adapter
SETTINGS_KEY = "settings"  # adapter_config.json: the method's settings dataclass as a dict
BASE_KEY = "base_model"  # adapter_config.json: the base model's config name (checked on load)


def freeze(model: nn.Module, patterns: Sequence[str] | None = None) -> int:
    """Stop gradients for every parameter (or those whose name matches a glob pattern); returns how many tensors."""
    return _set_trainable(model, patterns, False)


def unfreeze(model: nn.Module, patterns: Sequence[str] | None = None) -> int:
    """Train every parameter (or those whose name matches a glob pattern such as 'blocks.*.mlp.*'); returns how many."""
    return _set_trainable(model, patterns, True)


def _set_trainable(model: nn.Module, patterns: Sequence[str] | None, trainable: bool) -> int:
    changed = 0
    for name, parameter in model.named_parameters():
        if patterns is None or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            parameter.requires_grad_(trainable)
            changed += 1
    if patterns is not None and changed == 0:
        raise LlmkitError(f"no parameter name matches {list(patterns)}; names look like "
                          f"{[name for name, _ in model.named_parameters()][:4]}")
    return changed


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tensor shared by two names (a tied head) counts once."""
    seen: dict[int, nn.Parameter] = {}
    for parameter in model.parameters():
        seen[id(parameter)] = parameter
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total


def trainable_table(model: nn.Module) -> str:
    """A Markdown table of trainable parameters per part (embed, blocks.*.attn, blocks.*.mlp, ...) and the total."""
    rows: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        group = f"blocks.*.{parts[2]}" if parts[0] == "blocks" and len(parts) > 3 else parts[0]
        counts = rows.setdefault(group, [0, 0])
        counts[0] += parameter.numel() if parameter.requires_grad else 0
        counts[1] += parameter.numel()
    lines = ["| part | trainable | total |", "| --- | --- | --- |"]
    lines += [f"| {group} | {trainable:,} | {total:,} |" for group, (trainable, total) in rows.items() if trainable]
    trainable, total = count_parameters(model)
    lines.append(f"| **all** | **{trainable:,} ({100 * trainable / max(total, 1):.3f}%)** | **{total:,}** |")
    return "\n".join(lines)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require gradients, by name: exactly what a fine-tuning method trained."""
    return {name: parameter.detach() for name, parameter in model.named_parameters() if parameter.requires_grad}


def save_adapter(model: nn.Module, directory: str | Path, method: str, settings: Any) -> Path:
    """Write the trained parameters (only them) and the method's settings, each file atomically."""
    directory = Path(directory)
    tensors = {name: tensor.contiguous().cpu() for name, tensor in trainable_state_dict(model).items()}
    if not tensors:
        raise LlmkitError("the model has no trainable parameters to save; apply a fine-tuning method first")
    config = getattr(model, "config", None)
    record = {METHOD_KEY: method, SETTINGS_KEY: dataclasses.asdict(settings) if dataclasses.is_dataclass(settings)
              else dict(settings), BASE_KEY: getattr(config, "name", None)}
    atomic_write(directory / ADAPTER_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={METHOD_KEY: method}))
    atomic_write_text(directory / ADAPTER_CONFIG_FILE, json.dumps(record, indent=2))
    return directory


def read_adapter(directory: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(method, settings dict, tensors) of an adapter directory, with errors that name the file and the fix."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LlmkitError(f"{directory} is not an adapter directory; pass the folder `llmkit finetune` wrote")
    record = read_json_object(directory / ADAPTER_CONFIG_FILE)
    if METHOD_KEY not in record or SETTINGS_KEY not in record:
        raise LlmkitError(f"{directory / ADAPTER_CONFIG_FILE} lacks '{METHOD_KEY}' or '{SETTINGS_KEY}'; it was not "
                          "written by llmkit (a PEFT adapter? import it with llmkit's PEFT converter)")
    try:
        tensors = load_file(str(directory / ADAPTER_WEIGHTS_FILE))
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{directory / ADAPTER_WEIGHTS_FILE} is missing or unreadable ({error}); save the adapter "
                          "again") from None
    return record[METHOD_KEY], record[SETTINGS_KEY], tensors


def load_trained_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Copy saved adapter tensors into a model the method was just applied to; names and shapes must match."""
    expected = trainable_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise LlmkitError(f"{source} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                          "load it onto the base model (and settings) it was trained with")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if parameters[name].shape != tensor.shape:
                raise LlmkitError(f"{source}: {name} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(parameters[name].shape)}; the adapter belongs to another base model")
            parameters[name].copy_(tensor)
