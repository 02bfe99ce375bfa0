"""Every fine-tuning method by name: its settings dataclass and the function that applies it. `load_adapter`
re-applies the method a saved adapter names, then loads its trained tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.peft.adapters import apply_adapters
from llmkit.peft.core import ADAPTER_CONFIG_FILE, load_trained_tensors, read_adapter
from llmkit.peft.ia3 import apply_ia3
from llmkit.peft.lora import apply_lora
from llmkit.peft.prefix_tuning import apply_prefix_tuning
from llmkit.peft.prompt_tuning import apply_prompt_tuning
from llmkit.peft.qlora import apply_qlora
from llmkit.peft.selective import apply_selective
from llmkit.peft.settings import SETTINGS


def _with_tokenizer(apply: Callable) -> Callable:
    return lambda model, settings, tokenizer: apply(model, settings, tokenizer=tokenizer)


def _without_tokenizer(apply: Callable) -> Callable:
    return lambda model, settings, tokenizer: apply(model, settings)


# name -> (settings dataclass, from llmkit.peft.settings; apply(model, settings, tokenizer) -> model)
METHODS: dict[str, tuple[type, Callable[[nn.Module, Any, Any], nn.Module]]] = {
    "lora": (SETTINGS["lora"], _without_tokenizer(apply_lora)),
    "qlora": (SETTINGS["qlora"], _without_tokenizer(apply_qlora)),
    "prompt": (SETTINGS["prompt"], _with_tokenizer(apply_prompt_tuning)),
    "prefix": (SETTINGS["prefix"], _without_tokenizer(apply_prefix_tuning)),
    "ia3": (SETTINGS["ia3"], _without_tokenizer(apply_ia3)),
    "adapter": (SETTINGS["adapter"], _without_tokenizer(apply_adapters)),
    "selective": (SETTINGS["selective"], _without_tokenizer(apply_selective)),
}


def apply_method(model: nn.Module, method: str, settings: Any = None, tokenizer: Any = None) -> nn.Module:
    """Apply fine-tuning method `method` (default settings when None): the base freezes, the method's part trains."""
    if method not in METHODS:
        raise LlmkitError(f"unknown fine-tuning method {method!r}; choose one of {', '.join(METHODS)}")
    settings_class, apply = METHODS[method]
    return apply(model, settings if settings is not None else settings_class(), tokenizer)


def settings_from_dict(method: str, values: dict[str, Any]) -> Any:
    """Rebuild a method's settings dataclass from its saved dict (lists back to tuples where the field is one)."""
    settings_class = METHODS[method][0]
    known = {field.name for field in dataclasses.fields(settings_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LlmkitError(f"adapter settings have unknown fields {unknown} for method {method!r}; the adapter was saved "
                          "by another llmkit version")
    return settings_class(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})


def load_adapter(model: nn.Module, directory: str | Path, tokenizer: Any = None) -> nn.Module:
    """Apply the method an adapter directory names to `model` (its base) and load the trained tensors. Hugging Face
    PEFT directories (LoRA, IA3, prompt and prefix tuning) are recognised by their `peft_type` and imported."""
    record = read_json_object(Path(directory) / ADAPTER_CONFIG_FILE)
    if "peft_type" in record:
        if record["peft_type"] == "LORA":
            from llmkit.peft.hf_peft import import_peft_lora

            return import_peft_lora(model, directory)
        from llmkit.peft.hf_peft_other import import_peft_adapter

        return import_peft_adapter(model, directory)
    method, values, tensors = read_adapter(directory)
    if method not in METHODS:
        raise LlmkitError(f"{directory} was made by method {method!r}, which this llmkit does not know")
    model = apply_method(model, method, settings_from_dict(method, values), tokenizer)
    load_trained_tensors(model, tensors, directory)
    return model
