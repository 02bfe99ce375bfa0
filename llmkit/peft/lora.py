"""LoRA: low-rank adaptation of linear layers (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

A frozen weight W0 (out, in) gets a trainable update of rank r << min(in, out):

    y = W0 x + b + s B A dropout(x),   s = alpha / r,   A (r, in) Kaiming-uniform,   B (out, r) = 0

so training starts exactly at the base model and learns r (in + out) numbers per layer instead of in * out.
rsLoRA (Kalajdzievski 2023) uses s = alpha / sqrt(r), which keeps the update's size steady as r grows.
DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation") writes the adapted weight as a trained magnitude
m (out,) times a unit-norm direction; as in peft, the row norm is a constant for backprop (the paper's section 4.3):

    W' = m / ||W0 + s B A||_row * (W0 + s B A),   m initialised to ||W0||_row so W' = W0 at the start

Merging folds the update into the weight (W0 += s B A; W0 = W' for DoRA), so inference costs nothing extra.
Several named adapters can sit on one base; one is active at a time (`set_adapter`).
"""

from __future__ import annotations

import fnmatch
import itertools
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.nn.linear import Linear, linear
from llmkit.peft.core import freeze
from llmkit.peft.settings import LLAMA_PROJECTIONS, LORA_INITS, LoraInit, LoraSettings  # noqa: F401 (re-exported)

PLAIN_LINEARS = (nn.Linear, Linear)  # float linears whose weight and bias LoraLinear takes over
INITS = LORA_INITS


class LoraLinear(nn.Module):
    """A linear layer plus named low-rank adapters (math in the module docstring).

    A float `nn.Linear` base hands over its `weight` and `bias`, so the state dict names do not change
    (blocks.0.attn.q_proj.weight); any other base (a quantised linear such as NF4Linear, exposing in_features,
    out_features and a forward) is kept whole as `base` and called as base(x); merging and DoRA refuse it.
    Adapter tensors: lora_A.<name> (r, in), lora_B.<name> (out, r) and, for DoRA, lora_magnitude.<name> (out,).
    """

    def __init__(self, base: nn.Module, name: str) -> None:
        super().__init__()
        self.name = name  # where it sits in the model, for messages
        self.in_features, self.out_features = base.in_features, base.out_features
        self.base_class = type(base)
        if type(base) in PLAIN_LINEARS:  # exact types: a subclass (a quantised one, say) may store `weight` otherwise
            self.weight, self.bias = base.weight, base.bias
            self.base = None
        else:
            self.base = base
        self.lora_A, self.lora_B, self.lora_magnitude = nn.ParameterDict(), nn.ParameterDict(), nn.ParameterDict()
        self.settings: dict[str, LoraSettings] = {}
        self.active: str | None = None  # the adapter the forward adds; None: this layer passes the base through
        self.merged: str | None = None  # the adapter folded into `weight` by `merge`
        self.disabled = False  # set by `disable_adapters`
        # DoRA: the row norm at merge time, which `unmerge` divides by (a buffer so it moves with the model)
        self.register_buffer("merged_norm", None, persistent=False)
        # multi-LoRA (llmkit.peft.multi_lora): a per-row adapter plan set by `batch_adapters`, and its cached tensors
        self.batch_plan = None
        self.multi_lora_cache = None

    def add(self, settings: LoraSettings) -> None:
        """New adapter tensors: A initialised as `settings.init` says, B zero (so the output is unchanged)."""
        if self.base is None:
            device, dtype = self.weight.device, self.weight.dtype
        else:  # a quantised base: adapters in the default float dtype on the base's device
            device = next(itertools.chain(self.base.parameters(), self.base.buffers())).device
            dtype = torch.get_default_dtype()
        a_matrix = torch.empty(settings.rank, self.in_features, device=device, dtype=dtype)
        if settings.init == "kaiming":
            nn.init.kaiming_uniform_(a_matrix, a=math.sqrt(5))  # nn.Linear's init, as loralib and peft
        else:
            nn.init.normal_(a_matrix, std=1 / settings.rank)
        name = settings.adapter_name
        self.lora_A[name] = nn.Parameter(a_matrix, requires_grad=False)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, settings.rank, device=device, dtype=dtype),
                                         requires_grad=False)
        self.settings[name] = settings
        if settings.dora:
            norm = self.row_norm(self.float_weight("DoRA"), name)  # = ||W0||_row while B is zero
            self.lora_magnitude[name] = nn.Parameter(norm, requires_grad=False)

    def float_weight(self, purpose: str) -> torch.Tensor:
        """W0 (out, in); merging and DoRA need it, so they refuse a quantised base."""
        if self.base is not None:
            other = "use plain LoRA (dora=False)" if purpose == "DoRA" else "keep base and adapter separate"
            raise LlmkitError(f"{purpose} needs the float weight of {self.name}, but it is a quantised "
                              f"{type(self.base).__name__}; load the model unquantised (fp32 or bf16) for {purpose}, "
                              f"or {other}")
        return self.weight

    def delta(self, name: str) -> torch.Tensor:
        """s B A (out, in): the change this adapter makes to W0."""
        return self.settings[name].scale * (self.lora_B[name] @ self.lora_A[name])

    def row_norm(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        """||W0 + s B A|| per output row (out,), detached: DoRA's norm is a constant for backprop."""
        adapted = weight + self.delta(name).detach().to(weight.dtype)
        return torch.linalg.norm(adapted, dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x) if self.base is not None else linear(x, self.weight, self.bias)  # W0 x + b
        if self.batch_plan is not None and not self.disabled and self.merged is None:
            return self.batch_plan.add_updates(self, x, result)  # each row its own adapter (multi_lora.py)
        name = self.active
        if name is None or self.disabled or self.merged is not None:
            return result
        settings, a_matrix, b_matrix = self.settings[name], self.lora_A[name], self.lora_B[name]
        dropped = F.dropout(x, settings.dropout, self.training) if settings.dropout else x
        dropped = dropped.to(a_matrix.dtype)
        low_rank = F.linear(dropped, a_matrix)  # A dropout(x): (..., r)
        if not settings.dora and result.dtype == b_matrix.dtype:
            # result + s (A x) B^T as one GEMM (beta = 1, alpha = s): no separate passes over (..., out) for the
            # scaling and the sum, forward or backward
            out = torch.addmm(result.reshape(-1, self.out_features), low_rank.reshape(-1, low_rank.shape[-1]),
                              b_matrix.t(), alpha=settings.scale)  # (N, out)
            return out.view(result.shape)
        update = F.linear(low_rank, b_matrix) * settings.scale  # s B A dropout(x): (..., out)
        if not settings.dora:
            return result + update.to(result.dtype)
        # DoRA: y = b + (m / norm) (W0 x + s B A x), written as peft does: result + (m/norm - 1) W0 x + (m/norm) update
        weight = self.float_weight("DoRA")
        magnitude_scale = self.lora_magnitude[name] / self.row_norm(weight, name)  # (out,)
        if settings.dropout and self.training:
            base_part = F.linear(dropped, weight.to(dropped.dtype))  # W0 dropout(x): the same input as the update's
        else:
            base_part = result - self.bias if self.bias is not None else result
        return result + ((magnitude_scale - 1) * base_part + magnitude_scale * update).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter into the weight: W0 += s B A (DoRA: W0 = m / ||W0 + s B A|| (W0 + s B A))."""
        name = self.active
        if name is None or self.merged is not None:
            return
        weight = self.float_weight("merging LoRA")
        if self.settings[name].dora:
            self.merged_norm = self.row_norm(weight, name)
            weight.add_(self.delta(name).to(weight.dtype))
            weight.mul_((self.lora_magnitude[name] / self.merged_norm)[:, None].to(weight.dtype))
        else:
            weight.add_(self.delta(name).to(weight.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge` (exact up to float rounding)."""
        name = self.merged
        if name is None:
            return
        weight = self.float_weight("unmerging LoRA")
        if self.settings[name].dora:
            weight.div_((self.lora_magnitude[name] / self.merged_norm)[:, None].to(weight.dtype))
            self.merged_norm = None
        weight.sub_(self.delta(name).to(weight.dtype))
        self.merged = None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, adapters={list(self.settings)}, "
                f"active={self.active}, merged={self.merged}")


# --------------------------------------------------------------------------- model-level functions


def apply_lora(model: nn.Module, settings: LoraSettings | None = None) -> nn.Module:
    """Freeze the model and add one trainable adapter to every targeted linear layer (in place); returns the model."""
    settings = settings or LoraSettings()
    if lora_layers(model):
        raise LlmkitError(f"the model already has LoRA adapters {adapter_names(model)}; add another with "
                          "add_adapter(model, settings) (a new adapter_name) or merge_and_unload it first")
    freeze(model)
    add_adapter(model, settings)
    return set_adapter(model, settings.adapter_name)


def add_adapter(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Add another named adapter (frozen and inactive until `set_adapter`), wrapping newly targeted layers."""
    if settings.adapter_name in adapter_names(model):
        raise LlmkitError(f"the model already has an adapter named {settings.adapter_name!r}; choose another "
                          "adapter_name")
    if any(layer.merged is not None for layer in lora_layers(model).values()):
        raise LlmkitError(f"cannot add adapter {settings.adapter_name!r} while another is merged into the weights; "
                          "call unmerge_lora(model) first")
    layers = linear_layers(model)
    targets = [name for name in layers if any(_matches(name, pattern) for pattern in settings.targets)]
    if not targets:
        raise LlmkitError(f"LoRA targets {list(settings.targets)} match no linear layer; the model's linear layers are "
                          f"named like {list(layers)[:4]}: pass names such as 'q_proj' or globs like 'blocks.*.mlp.*'")
    for name in targets:
        layer = layers[name]
        if not isinstance(layer, LoraLinear):
            layer = LoraLinear(layer, name)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, layer)
        layer.add(settings)
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Make adapter `name` the one every layer adds and the only one that trains."""
    layers = _require_lora(model)
    if name not in adapter_names(model):
        raise LlmkitError(f"the model has no adapter {name!r}; it has {adapter_names(model)}")
    if any(layer.merged is not None for layer in layers.values()):
        raise LlmkitError(f"cannot switch to adapter {name!r} while one is merged into the weights; call "
                          "unmerge_lora(model) first")
    for layer in layers.values():
        layer.active = name if name in layer.settings else None
        for parameters in (layer.lora_A, layer.lora_B, layer.lora_magnitude):
            for adapter, parameter in parameters.items():
                parameter.requires_grad_(adapter == name)
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """Every adapter name on the model, in the order they were added."""
    return list(dict.fromkeys(name for layer in lora_layers(model).values() for name in layer.settings))


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes the base model's outputs (a merged adapter is unmerged meanwhile)."""
    layers = _require_lora(model)
    was_merged = any(layer.merged is not None for layer in layers.values())
    unmerge_lora(model)
    for layer in layers.values():
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers.values():
            layer.disabled = False
        if was_merged:
            merge_lora(model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each layer's active adapter into its weight (layers stay LoraLinear, marked merged); needs float weights."""
    for layer in _require_lora(model).values():
        layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged adapters back out of the weights."""
    for layer in _require_lora(model).values():
        layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapter and put plain linear layers back: the base model's exact parameter names."""
    for name, layer in _require_lora(model).items():
        layer.float_weight("merge_and_unload")
        layer.merge()
        plain = layer.base_class(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        plain.weight = layer.weight
        plain.bias = layer.bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, plain)
    return model


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every LoraLinear of the model by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer LoRA can wrap (nn.Linear, quantised linears, LoraLinear), not those inside a LoraLinear."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in layers):
            continue
        if isinstance(module, (nn.Linear, LoraLinear)) or (hasattr(module, "in_features") and
                                                          hasattr(module, "out_features")):
            layers[name] = module
    return layers


def _matches(name: str, pattern: str) -> bool:
    """A pattern names the whole module path or its last dotted parts: 'q_proj', 'attn.q_proj', 'blocks.1.*'."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def _require_lora(model: nn.Module) -> dict[str, LoraLinear]:
    layers = lora_layers(model)
    if not layers:
        raise LlmkitError("the model has no LoRA layers; call apply_lora(model, LoraSettings(...)) first")
    return layers
