"""Sparse upcycling (Komatsuzaki et al. 2022, "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints"): a trained dense model becomes a mixture of experts by copying each block's FFN into every expert
and adding a freshly initialised router; training then continues from the dense model's quality instead of
from scratch.

With the top-k router the gate weights of a token are renormalised to sum to 1 and the experts are identical, so
right after upcycling y = sum_k g_k * FFN(x) = FFN(x): the model computes the dense function (up to float
rounding). The switch router scales the FFN output by the chosen probability (about 1/n_experts at first) and
drops tokens over capacity, so it starts away from the dense function.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Literal

import torch
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.nn.moe import MoE

ROUTER_INIT_STD = 0.02  # small random router: near-uniform probabilities, random but stable first choices


def upcycle_to_moe(
    model: nn.Module,
    n_experts: int,
    experts_per_token: int | None = None,
    router: Literal["topk", "switch"] = "topk",
    capacity_factor: float = 1.25,
    router_std: float = ROUTER_INIT_STD,
) -> nn.Module:
    """Replace every block's FFN of `model` (a dense Decoder) by `n_experts` copies of it behind a new router
    initialised N(0, router_std); updates `model.config`. In place; returns the model.

    Raises:
        LlmkitError: the model is already a mixture of experts, or the expert settings are impossible.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "blocks"):
        raise LlmkitError(f"cannot upcycle a {type(model).__name__}: pass an llmkit Decoder (with .config and .blocks)")
    if config.n_experts:
        raise LlmkitError(f"model {config.name!r} is already a mixture of {config.n_experts} experts; upcycle a dense "
                          "model")
    moe_config = dataclasses.replace(config, n_experts=n_experts, experts_per_token=experts_per_token, router=router,
                                     capacity_factor=capacity_factor)  # validates the expert settings
    for block in model.blocks:
        dense = block.mlp
        weight = next(dense.parameters())
        layer = MoE(moe_config, experts=[copy.deepcopy(dense) for _ in range(n_experts)])
        layer.router.to(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.router.weight.normal_(mean=0.0, std=router_std)
        block.mlp = layer
    model.config = moe_config
    return model
