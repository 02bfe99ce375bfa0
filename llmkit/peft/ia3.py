"""(IA)^3, "Infused Adapter by Inhibiting and Amplifying Inner Activations" (Liu et al. 2022): learned vectors
rescale activations, everything else frozen:

    k = l_k * (W_k x)      v = l_v * (W_v x)      y = W_down (l_ff * h)      (l initialised to ones: the base model)

A vector on an output (k_proj, v_proj) has one entry per output feature; on a feed-forward input (down_proj) one per
input feature. Both are linear in the weight, so merging is W <- diag(l) W (output; the bias too) or W diag(l)
(input), exactly undone by dividing. Defaults follow peft's IA3 targets for Llama.
"""

from __future__ import annotations

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.nn.linear import Linear, linear
from llmkit.peft.core import freeze
from llmkit.peft.settings import IA3Settings  # noqa: F401 (re-exported)

IA3_SCALE = "ia3_scale"  # parameter name of the learned vector inside each scaled linear


class IA3Linear(Linear):
    """A linear whose output (or, for a feed-forward layer, input) is scaled by a learned vector. It holds the base
    layer's own weight and bias tensors, so their parameter names do not change."""

    def __init__(self, base: nn.Linear, feedforward: bool) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.feedforward = feedforward
        size = self.in_features if feedforward else self.out_features
        self.ia3_scale = nn.Parameter(torch.ones(size, dtype=base.weight.dtype, device=base.weight.device))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return linear(x, self.weight, self.bias)
        if self.feedforward:
            return linear(x * self.ia3_scale, self.weight, self.bias)
        return linear(x, self.weight, self.bias) * self.ia3_scale

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, feedforward={self.feedforward}, merged={self.merged}"


def ia3_layers(model: nn.Module) -> dict[str, IA3Linear]:
    """Every IA3-scaled linear of `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, IA3Linear)}


def apply_ia3(model: nn.Module, settings: IA3Settings | None = None) -> nn.Module:
    """Freeze the model and give each target linear a trainable vector of ones; in place, returns the model."""
    settings = settings or IA3Settings()
    if ia3_layers(model):
        raise LlmkitError("the model already has IA3 vectors; apply IA3 to a fresh base model")
    chosen = [(name, module) for name, module in model.named_modules() if name.rsplit(".", 1)[-1] in settings.targets]
    if not chosen:
        raise LlmkitError(f"IA3 targets {list(settings.targets)} match no module of {type(model).__name__}; "
                          "use the last part of a linear's name, e.g. 'k_proj' for blocks.0.attn.k_proj")
    wrong = [name for name, module in chosen if not isinstance(module, nn.Linear)]
    if wrong:
        raise LlmkitError(f"IA3 target {wrong[0]} is a {type(model.get_submodule(wrong[0])).__name__}, not a linear "
                          "layer; name only linear layers in IA3Settings.targets")
    freeze(model)
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, IA3Linear(module, feedforward=child in settings.feedforward))
    return model


def merge_ia3(model: nn.Module) -> nn.Module:
    """Fold every vector into its linear's weight (and bias, for output scaling): same outputs, no extra work per
    token. The vectors stay (for `unmerge_ia3`) but no longer act."""
    layers = _layers_or_raise(model)
    with torch.no_grad():
        for layer in layers.values():
            if layer.merged:
                continue
            if layer.feedforward:
                layer.weight.mul_(layer.ia3_scale[None, :])  # (out, in) * (1, in): scales each input column
            else:
                layer.weight.mul_(layer.ia3_scale[:, None])  # (out, in) * (out, 1): scales each output row
                if layer.bias is not None:
                    layer.bias.mul_(layer.ia3_scale)
            layer.merged = True
    return model


def unmerge_ia3(model: nn.Module) -> nn.Module:
    """Undo `merge_ia3` by dividing the vectors back out; refused when a vector holds a zero (not invertible)."""
    layers = _layers_or_raise(model)
    for name, layer in layers.items():
        if layer.merged and bool((layer.ia3_scale == 0).any()):
            raise LlmkitError(f"{name}.{IA3_SCALE} holds a zero, so its merge cannot be undone; reload the base model "
                              "and apply the adapter again instead of unmerging")
    with torch.no_grad():
        for layer in layers.values():
            if not layer.merged:
                continue
            if layer.feedforward:
                layer.weight.div_(layer.ia3_scale[None, :])
            else:
                layer.weight.div_(layer.ia3_scale[:, None])
                if layer.bias is not None:
                    layer.bias.div_(layer.ia3_scale)
            layer.merged = False
    return model


def _layers_or_raise(model: nn.Module) -> dict[str, IA3Linear]:
    layers = ia3_layers(model)
    if not layers:
        raise LlmkitError(f"{type(model).__name__} has no IA3 vectors to merge or unmerge; call apply_ia3 first")
    return layers
