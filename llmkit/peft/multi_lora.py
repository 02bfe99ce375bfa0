"""Many LoRA adapters on one base model, in one batch, never merged (S-LoRA, Sheng et al. 2023, "S-LoRA: Serving
Thousands of Concurrent LoRA Adapters"; Punica, Chen et al. 2023, "Punica: Multi-Tenant LoRA Serving").

Each adapted linear layer (a `LoraLinear`, llmkit.peft.lora) holds its base once (a float weight, or any quantised
linear whose forward is the base product) and a table of adapters, name -> A_i (r_i, in), B_i (out, r_i), s_i; the
ranks may differ. For a batch x (B, T, in) whose row b uses adapter a(b) (or none):

    y_b = base(x_b) + s_a(b) B_a(b) A_a(b) x_b          (rows without an adapter: base(x_b) only)

computed as one base product for the whole batch plus two products over the adapters the batch uses, side by side
(the batched-gather idea of Punica's BGMV kernel, written with stock GEMMs): with A_cat (R, in) the used adapters'
A stacked by rows and B_cat (out, R) their B side by side (R = sum of their ranks),

    y = base(x) + ((x A_cat^T) * M) B_cat^T,    M (B, 1, R): s_a(b) on the columns of row b's adapter, 0 elsewhere

so a row picks up exactly its own adapter's update and the cost is three kernels per layer however many adapters
share the batch. A_cat and B_cat are cached per layer for the set of adapters in use (steady decoding reuses them).

Which adapter each row uses is told per forward, explicitly:

    load_lora_adapter(model, "sql", "runs/sql/adapter")           # llmkit finetune's adapter dir, or a PEFT LoRA dir
    load_lora_adapter(model, "summarize", "peft_dir/")
    with batch_adapters(model, ["sql", None, "summarize"]):         # one entry per batch row (dim 0 of the ids)
        logits = model(ids)                                         # ids (3, T): row 1 runs the base model alone
    remove_lora_adapter(model, "sql")

Only LoRA adapters (plain or QLoRA-trained; their A and B apply to whatever base the model was loaded as) are
accepted: DoRA, IA3, prompt/prefix tuning and bottleneck adapters change the model in ways no per-row low-rank
update expresses, and are refused with a message. Outside `batch_adapters` the model computes the base alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import read_json_object
from llmkit.peft.core import ADAPTER_CONFIG_FILE, METHOD_KEY, SETTINGS_KEY, load_trained_tensors, read_adapter
from llmkit.peft.lora import LoraLinear, adapter_names, add_adapter, apply_lora, lora_layers, set_adapter

LORA_METHODS = ("lora", "qlora")  # llmkit adapter methods whose files hold plain LoRA A/B tensors
PEFT_LORA_TYPE = "LORA"


def check_lora_adapter_dir(directory: str | Path) -> dict[str, Any]:
    """The adapter_config.json record of a LoRA adapter directory (llmkit's or PEFT's); one readable error for a
    missing directory, another method (IA3, prefix, ...) or DoRA. Reads only the config: the model is not touched."""
    directory = Path(directory)
    if not directory.is_dir():
        raise LlmkitError(f"adapter path {directory} is not a directory; pass the folder holding "
                          f"{ADAPTER_CONFIG_FILE} (llmkit finetune's OUTPUT/adapter, or a PEFT LoRA adapter)")
    record = read_json_object(directory / ADAPTER_CONFIG_FILE)
    if "peft_type" in record:
        kind = record["peft_type"]
        dora = bool(record.get("use_dora"))
    else:
        if METHOD_KEY not in record:
            raise LlmkitError(f"{directory / ADAPTER_CONFIG_FILE} names neither a peft_type nor an llmkit method; "
                              "pass an adapter directory written by llmkit finetune or peft")
        kind = record[METHOD_KEY]
        dora = bool(record.get(SETTINGS_KEY, {}).get("dora"))
    if kind not in (PEFT_LORA_TYPE, *LORA_METHODS):
        raise LlmkitError(f"{directory} holds a {kind!r} adapter; multi-adapter batching takes LoRA adapters only "
                          "(lora or qlora): merge this one into its own model copy instead")
    if dora:
        raise LlmkitError(f"{directory} is a DoRA adapter; multi-adapter batching takes plain LoRA only (DoRA rescales "
                          "each weight row, which no per-row low-rank update expresses): merge it into a model copy")
    return record


def load_lora_adapter(model: nn.Module, name: str, directory: str | Path) -> nn.Module:
    """Add the LoRA adapter saved at `directory` to `model` under `name`, through llmkit's own loaders (PEFT's
    `import_peft_lora`, llmkit's `read_adapter` + `load_trained_tensors`). The adapter starts inactive: it applies to
    the rows `batch_adapters` gives it. In place; returns the model.

    Raises:
        LlmkitError: not a LoRA adapter directory, DoRA, a name already in use, or tensors that do not fit the model.
    """
    record = check_lora_adapter_dir(directory)
    if name in adapter_names(model):
        raise LlmkitError(f"the model already has an adapter named {name!r}; remove it first or choose another name")
    try:
        if "peft_type" in record:
            from llmkit.peft.hf_peft import import_peft_lora

            import_peft_lora(model, directory, adapter_name=name)
        else:
            _load_llmkit_lora(model, name, Path(directory))
    except BaseException:
        if name in adapter_names(model):
            remove_lora_adapter(model, name)
        raise
    _deactivate(model)
    return model


def _load_llmkit_lora(model: nn.Module, name: str, directory: Path) -> None:
    """An llmkit lora/qlora adapter directory added as `name` (its tensors' adapter suffix renamed to `name`)."""
    from llmkit.peft.registry import settings_from_dict

    method, values, tensors = read_adapter(directory)
    settings = settings_from_dict(method, values)
    if method == "qlora":
        settings = settings.lora()  # the A/B tensors only: the base stays as the model was loaded
    saved_name = settings.adapter_name
    settings = dataclasses.replace(settings, adapter_name=name)
    if lora_layers(model):
        add_adapter(model, settings)
    else:
        apply_lora(model, settings)
    set_adapter(model, name)  # the trainable tensors are now exactly this adapter's: load_trained_tensors checks them
    suffix = f".{saved_name}"
    renamed = {(key[: -len(suffix)] + f".{name}" if key.endswith(suffix) else key): tensor
               for key, tensor in tensors.items()}
    load_trained_tensors(model, renamed, directory)


def _deactivate(model: nn.Module) -> None:
    """No adapter is the layers' default any more, and none trains: rows pick adapters through `batch_adapters`."""
    for layer in lora_layers(model).values():
        layer.active = None
        for table in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            for parameter in table.values():
                parameter.requires_grad_(False)


def remove_lora_adapter(model: nn.Module, name: str) -> nn.Module:
    """Drop adapter `name` from every layer (its memory is freed once no batch plan refers to it). In place."""
    layers = lora_layers(model)
    if name not in adapter_names(model):
        raise LlmkitError(f"the model has no adapter {name!r}; it has {adapter_names(model)}")
    merged = next((layer for layer in layers.values() if layer.merged is not None), None)
    if merged is not None:
        raise LlmkitError(f"cannot remove adapter {name!r} while {merged.merged!r} is merged into {merged.name}; "
                          "call unmerge_lora(model) first")
    for layer in layers.values():
        for table in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            if name in table:
                del table[name]
        layer.settings.pop(name, None)
        if layer.active == name:
            layer.active = None
        layer.multi_lora_cache = None
    return model


@contextmanager
def batch_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row b of every forward's batch (dim 0) adds adapter names[b] (None: the base alone).
    Every forward inside must have len(names) rows. A model without LoRA layers accepts an all-None list."""
    names = list(names)
    layers = lora_layers(model)
    known = {name for layer in layers.values() for name in layer.settings}
    unknown = sorted({name for name in names if name is not None and name not in known})
    if unknown:
        raise LlmkitError(f"batch_adapters names adapters {unknown} the model does not have; it has {sorted(known)}: "
                          "load them with load_lora_adapter(model, name, directory)")
    plan = RowAdapters(names) if any(name is not None for name in names) else None
    for layer in layers.values() if plan is not None else ():
        if any(layer.settings[name].dora for name in plan.used if name in layer.settings):
            raise LlmkitError(f"{layer.name} holds a DoRA adapter; batch_adapters takes plain LoRA adapters only")
    previous = {name: layer.batch_plan for name, layer in layers.items()}
    for layer in layers.values():
        layer.batch_plan = plan
    try:
        yield model
    finally:
        for name, layer in layers.items():
            layer.batch_plan = previous[name]


class RowAdapters:
    """A batch's adapter per row, and the update each LoraLinear adds for it (math in the module docstring)."""

    def __init__(self, names: list[str | None]) -> None:
        self.names = names
        self.used = list(dict.fromkeys(name for name in names if name is not None))  # in order of first use
        self._masks: dict[tuple, torch.Tensor] = {}  # per (layer's adapters used, device, dtype): M (B, 1, R)

    def add_updates(self, layer: LoraLinear, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result (B, ..., out) = base(x) plus each row's s B A x for x (B, ..., in)."""
        if x.shape[0] != len(self.names):
            raise LlmkitError(f"batch_adapters was given {len(self.names)} adapter names but {layer.name} sees a batch "
                              f"of {x.shape[0]} rows; pass one name (or None) per row")
        used = tuple(name for name in self.used if name in layer.settings)
        if not used:
            return result
        a_cat, b_cat = _stacked(layer, used)  # (R, in), (out, R)
        mask = self._mask(layer, used, a_cat)  # (B, 1, R)
        low_rank = F.linear(x.to(a_cat.dtype), a_cat)  # (B, T, R): every used adapter's A x
        low_rank.mul_(mask.view(mask.shape[0], *([1] * (low_rank.dim() - 2)), mask.shape[-1]))  # its own, scaled
        if result.dtype == b_cat.dtype:  # result + low_rank B_cat^T as one GEMM (beta = 1), as LoraLinear does
            out = torch.addmm(result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), b_cat.t())
            return out.view(result.shape)  # (B, T, out)
        return result + F.linear(low_rank, b_cat).to(result.dtype)  # (B, T, out)

    def _mask(self, layer: LoraLinear, used: tuple[str, ...], like: torch.Tensor) -> torch.Tensor:
        key = (used, tuple(layer.settings[name].rank for name in used), like.device, like.dtype)
        mask = self._masks.get(key)
        if mask is None:
            columns = torch.zeros(len(self.names), sum(layer.settings[name].rank for name in used))  # (B, R)
            start = 0
            for name in used:
                rank = layer.settings[name].rank
                rows = [row for row, row_name in enumerate(self.names) if row_name == name]
                columns[rows, start : start + rank] = layer.settings[name].scale
                start += rank
            mask = self._masks[key] = columns.to(like.device, like.dtype)[:, None]  # (B, 1, R)
        return mask


def _stacked(layer: LoraLinear, used: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat (R, in), B_cat (out, R)) of the adapters `used` on `layer`, cached on it until the set or a tensor
    changes (storage and in-place version counter of each tensor are part of the key)."""
    key = tuple((name, *(_identity(layer.lora_A[name])), *(_identity(layer.lora_B[name]))) for name in used)
    cache = layer.multi_lora_cache
    if cache is None or cache[0] != key:
        with torch.no_grad():
            a_cat = torch.cat([layer.lora_A[name].detach() for name in used])  # (R, in)
            b_cat = torch.cat([layer.lora_B[name].detach() for name in used], dim=1)  # (out, R)
        cache = layer.multi_lora_cache = (key, a_cat, b_cat)
    return cache[1], cache[2]


def _identity(tensor: torch.Tensor) -> tuple[int, int]:
    """(storage address, in-place version) of a tensor; an inference-mode tensor keeps no version counter (0)."""
    return tensor.data_ptr(), 0 if tensor.is_inference() else tensor._version
