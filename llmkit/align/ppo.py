"""PPO with a KL penalty for language models (Schulman et al. 2017, "Proximal Policy Optimization Algorithms";
Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"; Ouyang et al. 2022, InstructGPT).

Each response is an episode; each response token is an action. A rollout (llmkit.align.rollout) samples responses
and records, per token t, the policy's log-prob log p_t (the "old" log-prob), the frozen reference's log p_ref_t and
the value V_t of the state before the token. The rewards are

    r_t = -beta * KL_t  (+ score at the last response token),   score = reward(prompt, response) [- missing-EOS penalty]

with a per-token KL estimate (Schulman 2020, "Approximating KL divergence"), x ~ p, r = p_ref(x) / p(x):

    k1 = log p - log p_ref          unbiased, can be negative
    k3 = (r - 1) - log r            unbiased, never negative, lower variance when p is close to p_ref

beta is fixed, or adaptive (Ziegler et al. 2019): e = clip(KL / target - 1, -0.2, 0.2), beta <- beta (1 + e n / horizon)
for n rollouts of mean per-sequence KL. Advantages are GAE (Schulman et al. 2016):

    delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lambda A_{t+1}   (V and A are 0 after the last token)
    returns R_t = A_t + V_t

then whitened over the batch. Several epochs of minibatch updates minimise

    policy loss  mean_t max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),   rho_t = exp(log p_t(new) - log p_t(old))
    value loss   mean_t 0.5 max((V_new - R)^2, (clip(V_new, V_old - c, V_old + c) - R)^2)
    loss = policy loss + vf_coef * value loss

logging the entropy, approx KL (mean 0.5 (log rho)^2) and the clip fraction (share of tokens whose ratio left the
clip range). The value head is a linear d_model -> 1 on the policy's final-normed hidden states: it shares the
backbone (and, with LoRA, the adapters), as in TRL's PPO trainer. All means over tokens count response tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llmkit.align.settings import KLEstimator
from llmkit.errors import LlmkitError

ADAPTIVE_CLIP = 0.2  # Ziegler et al. 2019: the proportional error is clipped to +-0.2


# ---- KL penalty and its controller -----------------------------------------------------------------------------------

def kl_estimate(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: KLEstimator) -> torch.Tensor:
    """Per-token estimate of KL(p || p_ref) at tokens sampled from p (any shape): k1 or k3 (module docstring)."""
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k3":
        log_ratio = ref_logps - logps  # log r, r = p_ref / p
        return torch.expm1(log_ratio) - log_ratio
    raise LlmkitError(f"--kl_estimator {estimator} is unknown; choose k1 or k3")


class KLController:
    """The KL coefficient beta: fixed (`target` None) or adaptive toward `target` nats per sequence."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000) -> None:
        self.coef, self.target, self.horizon = coef, target, horizon

    def update(self, kl: float, n: int) -> float:
        """After a rollout of `n` sequences whose mean per-sequence KL is `kl`: the new beta."""
        if self.target is not None:
            error = min(max(kl / self.target - 1, -ADAPTIVE_CLIP), ADAPTIVE_CLIP)
            self.coef *= 1 + error * n / self.horizon
        return self.coef


def token_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, estimator: KLEstimator) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), each (B, L): -kl_coef * KL_t on every response token, plus the score (B,) on each row's last
    response token; `mask` (B, L) marks the response tokens (a prefix of each row)."""
    kl = kl_estimate(logps, ref_logps, estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(dim=1) - 1).clamp(min=0).long()  # (B,)
    rewards[torch.arange(len(last), device=last.device), last] += scores * (mask.sum(dim=1) > 0)
    return rewards, kl


# ---- advantages ------------------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), each (B, L), by GAE over each row's response tokens (module docstring). Tokens past a
    row's end (mask 0) get 0 and contribute no value to the bootstrap."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])  # (B,)
    length = rewards.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """x normalised to mean 0 and variance 1 over the masked entries (0 elsewhere)."""
    mean = masked_mean(x, mask)
    variance = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(variance + eps) * mask


# ---- losses ----------------------------------------------------------------------------------------------------------

@dataclass
class PolicyLoss:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        clip_range: float) -> PolicyLoss:
    """PPO's clipped surrogate (to minimise), its clip fraction and approx KL, all means over masked tokens."""
    log_ratio = (logps - old_logps) * mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_fraction = masked_mean(((ratio - 1).abs() > clip_range).float(), mask)
        approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return PolicyLoss(loss, clip_fraction, approx_kl)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       vf_clip: float) -> torch.Tensor:
    """0.5 * max((V - R)^2, (clip(V, V_old +- vf_clip) - R)^2), the mean over masked tokens."""
    clipped = old_values + (values - old_values).clamp(-vf_clip, vf_clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def masked_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the policy's next-token distributions (B, L, V) at the masked positions."""
    logp = logits.float().log_softmax(-1)
    return masked_mean(-(logp.exp() * logp).sum(-1), mask)


# ---- the policy with its value head ----------------------------------------------------------------------------------

class PolicyWithValue(nn.Module):
    """A decoder policy and a value head (linear d_model -> 1, on the final-normed hidden states) sharing its
    backbone. `score_responses` gives what PPO needs of responses that follow left-padded prompts."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.config = policy.config
        weight = policy.embed.weight
        self.value_head = nn.Linear(policy.config.d_model, 1, device=weight.device, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)  # V = 0 at the start: the first advantages are the rewards
        nn.init.zeros_(self.value_head.bias)

    def score_responses(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int,
                        with_values: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(log-probs (B, L) of the response tokens, values (B, L) of the states before them, logits (B, L, V)).
        `input_ids` (B, P + L): prompts left-padded to P tokens, responses right-padded to L; token P + j is predicted
        at position P + j - 1, where the value of the state before it is read too."""
        length = input_ids.shape[1] - prompt_len
        hidden = self.policy.hidden_states(input_ids, attention_mask=attention_mask)  # (B, P + L, C)
        before = hidden[:, prompt_len - 1:prompt_len - 1 + length]  # (B, L, C)
        logits = self.policy.head(before)  # (B, L, V)
        targets = input_ids[:, prompt_len:]  # (B, L)
        logps = torch.gather(logits.float().log_softmax(-1), 2, targets[..., None]).squeeze(-1)  # (B, L)
        values = None
        if with_values:
            values = self.value_head(self.policy.final_norm(before).float()).squeeze(-1)  # (B, L)
        return logps, values, logits


def response_logps_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int
                      ) -> torch.Tensor:
    """Log-probs (B, L) of the response tokens under a plain decoder (the reference)."""
    logits = model(input_ids, attention_mask=attention_mask)[:, prompt_len - 1:-1]  # (B, L, V)
    return torch.gather(logits.float().log_softmax(-1), 2, input_ids[:, prompt_len:, None]).squeeze(-1)


def kl_per_sequence(kl: torch.Tensor) -> torch.Tensor:
    """Summed per-token KL (B, L) -> (B,): nats per response, the unit of target_kl."""
    return kl.sum(dim=1)
