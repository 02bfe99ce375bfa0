"""Mixture of experts: a block's FFN becomes `n_experts` FFNs and a router that sends each token to a few of them,
so parameters grow with the number of experts while compute per token stays that of k FFNs.

Sparsely-gated mixture of experts (Shazeer et al. 2017, "Outrageously Large Neural Networks"). For a token x
(after the block's norm) the router gives logits l = W_r x, one per expert, and probabilities p = softmax(l):

    y = sum over e in chosen(x) of g_e(x) * expert_e(x)

Routers (`Config.router`):
  topk    Mixtral (Jiang et al. 2024): chosen = the k = experts_per_token largest p_e, g = those p renormalised to
          sum to 1 (softmax over all experts, then top-k, then renormalise: transformers' MixtralSparseMoeBlock).
  switch  Switch Transformer (Fedus et al. 2021): chosen = argmax p, g = p_e (not renormalised, so the router
          learns through it). An expert takes at most C = ceil(capacity_factor * N / n_experts) of the N tokens,
          first come first served in token order; a token over capacity gets a zero FFN output, so the block's
          residual carries it unchanged. Such dropped tokens are counted.

Auxiliary losses, per layer, from its last forward (`moe_aux_loss` sums them over layers; `causal_lm_loss` adds it
while training):
  load balancing (Switch eq. 4-6; Mixtral)  L_b = n_experts * sum_e f_e * P_e, f_e = the fraction of the N tokens
          routed to expert e (each of a token's k choices counts, before capacity drops, so sum_e f_e = k) and
          P_e = the mean of p_e over tokens. f has no gradient; through P it pushes tokens to under-used experts.
          Uniform routing gives L_b = k, transformers' `load_balancing_loss_func` for one layer.
  router z-loss (ST-MoE, Zoph et al. 2022)  L_z = mean over tokens of logsumexp(l)^2: keeps the router logits
          small, which keeps its softmax stable in low precision.
  loss = router_aux_loss_coef * L_b + router_z_loss_coef * L_z

Compute: each expert runs only on the tokens routed to it (index_select in, index_add out), never on every token.
Padding tokens are routed like real ones (the FFN never sees the attention mask).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.nn.linear import Linear
from llmkit.nn.mlp import MLP_CLASSES


class MoE(nn.Module):
    """`router` (a bias-free Linear, d_model -> n_experts) and `experts` (dense MLPs of kind `config.mlp`).

    After each forward: `load_balancing_loss` and `z_loss` (0-dim tensors, with their graph while training),
    `tokens_per_expert` (n_experts,) tokens each expert processed, `dropped_tokens` (token-expert assignments over
    capacity) and `routed_tokens` (assignments made: tokens x experts_per_token).
    """

    def __init__(self, config: Config, experts: list[nn.Module] | None = None) -> None:
        super().__init__()
        if config.n_experts < 1:
            raise LlmkitError(f"config {config.name!r}: n_experts={config.n_experts}; a mixture needs at least one "
                              "expert (n_experts=0 builds a dense FFN instead)")
        if experts is None:
            experts = [MLP_CLASSES[config.mlp](config) for _ in range(config.n_experts)]
        if len(experts) != config.n_experts:
            raise LlmkitError(f"{len(experts)} experts given, config {config.name!r} has n_experts={config.n_experts}")
        self.router = Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(experts)
        self.kind = config.router
        self.experts_per_token = config.experts_per_token
        self.capacity_factor = config.capacity_factor
        self.aux_loss_coef = config.router_aux_loss_coef
        self.z_loss_coef = config.router_z_loss_coef
        self.load_balancing_loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        self.tokens_per_expert: torch.Tensor | None = None
        self.dropped_tokens = 0
        self.routed_tokens = 0

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and probabilities (N, E) in float32, gate weights (N, k) and chosen experts (N, k) of
        tokens x (N, C)."""
        logits = self.router(x).float()  # (N, E)
        probs = logits.softmax(dim=-1)
        if self.kind == "switch":
            weights, chosen = probs.max(dim=-1, keepdim=True)  # (N, 1)
        else:
            weights, chosen = probs.topk(self.experts_per_token, dim=-1)  # (N, k)
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, probs, weights, chosen

    def capacity(self, n_tokens: int) -> int:
        """Most tokens one expert takes: ceil(capacity_factor * N / n_experts) for switch, unbounded for top-k."""
        if self.kind != "switch":
            return n_tokens
        return math.ceil(self.capacity_factor * n_tokens / len(self.experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, C)
        logits, probs, weights, chosen = self.route(x)
        n_tokens, k = chosen.shape
        n_experts = len(self.experts)
        flat_chosen, flat_weights = chosen.flatten(), weights.flatten()  # (N*k,): token t's choices at t*k ... t*k+k-1
        order = flat_chosen.argsort(stable=True)  # assignments grouped by expert, in token order within each group
        counts = torch.bincount(flat_chosen, minlength=n_experts)  # (E,)
        capacity = self.capacity(n_tokens)
        out = torch.zeros_like(x)
        processed, start = [], 0
        for expert, count in zip(self.experts, counts.tolist()):
            assignments = order[start:start + min(count, capacity)]  # the first `capacity` tokens; the rest drop
            start += count
            processed.append(len(assignments))
            if not len(assignments):
                continue
            tokens = assignments // k
            y = expert(x.index_select(0, tokens)) * flat_weights[assignments, None]  # (n, C)
            out.index_add_(0, tokens, y.to(out.dtype))

        fraction_routed = counts.float() / n_tokens  # f: (E,), sums to k
        mean_probability = probs.mean(dim=0)  # P: (E,)
        self.load_balancing_loss = n_experts * (fraction_routed * mean_probability).sum()
        self.z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        self.tokens_per_expert = torch.tensor(processed)
        self.routed_tokens = n_tokens * k
        self.dropped_tokens = self.routed_tokens - sum(processed)
        return out.view(shape)

    def aux_loss(self) -> torch.Tensor:
        """router_aux_loss_coef * load balancing + router_z_loss_coef * z-loss of the last forward."""
        if self.load_balancing_loss is None:
            raise LlmkitError("this MoE layer has not run a forward yet, so it has no auxiliary loss or routing "
                              "statistics; call the model on a batch first")
        return self.aux_loss_coef * self.load_balancing_loss + self.z_loss_coef * self.z_loss


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of `model`, in module order (empty for a dense model)."""
    return [module for module in model.modules() if isinstance(module, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum over MoE layers of their auxiliary losses from the last forward; a 0-dim zero for a dense model."""
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(())
    return torch.stack([layer.aux_loss() for layer in layers]).sum()


def expert_utilisation(model: nn.Module) -> dict[str, Any]:
    """How the last forward used the experts (empty for a dense model): tokens per expert of each layer, the
    smallest and largest share of a layer's assignments one expert got (1/n_experts each when balanced), experts
    that got nothing, dropped assignments, and the mean load-balancing and z-losses over layers."""
    layers = moe_layers(model)
    if not layers:
        return {}
    for layer in layers:
        layer.aux_loss()  # raises when a layer has not routed anything yet
    counts = torch.stack([layer.tokens_per_expert for layer in layers])  # (L, E)
    assigned = torch.tensor([layer.routed_tokens for layer in layers])  # (L,)
    share = counts / assigned[:, None].clamp(min=1)  # (L, E)
    dropped = sum(layer.dropped_tokens for layer in layers)
    return {
        "moe_tokens_per_expert": counts.tolist(),
        "moe_expert_share_min": share.min().item(),
        "moe_expert_share_max": share.max().item(),
        "moe_unused_experts": int((counts == 0).sum()),
        "moe_dropped_tokens": dropped,
        "moe_dropped_fraction": dropped / max(int(assigned.sum()), 1),
        "moe_load_balancing_loss": torch.stack([layer.load_balancing_loss.detach() for layer in layers]).mean().item(),
        "moe_z_loss": torch.stack([layer.z_loss.detach() for layer in layers]).mean().item(),
    }
